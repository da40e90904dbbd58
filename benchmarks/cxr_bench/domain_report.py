"""``domain.md``: the out-of-domain report for people, one function per section."""
from __future__ import annotations

from typing import Any, Dict, List

from .domain_kinds import CONTROLS
from .util import fmt_num, fmt_pct, md_table


def render_markdown(report: Dict[str, Any]) -> str:
    """The report for people: one table of flag rates and one of AUROCs, models as rows, then the
    sections the run asked for (foreign images, originals, operating points, branches)."""
    models = [m for m in report["models"] if m.get("domain")]
    lines = ["# Out-of-domain check", "",
             f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}: `{report['command']}`", "",
             f"In-domain: the {report['data']['n_images']} images of `{report['data']['root']}` (never used to fit or "
             f"calibrate). Out-of-domain: {report['count_per_kind']} images per kind, built deterministically "
             "(see `cxr_bench/domain_kinds.py`). Flag rate: share of images whose domain score exceeds the model's "
             "threshold (calibrated to flag 5% of the validation part of the training split). AUROC: test X-rays "
             "against that kind.", ""]
    if not models:
        return "\n".join(lines + ["No model had domain statistics.", ""])
    lines += _built_kinds(models)
    lines += _foreign([m for m in models if m.get("foreign")], report.get("foreign"))
    lines += _originals([m for m in models if m.get("originals")], report.get("originals"))
    lines += _operating_points([m for m in models if m.get("operating_points")])
    lines += _branches([m for m in models if m["domain"].get("flagged_validation_by_branch")])
    return "\n".join(lines)


def _branch_counts(counts: Dict[str, int]) -> str:
    """``{branch: images}`` as ``"thumb8 3, orientation 1"``, most first; ``-`` when empty."""
    return ", ".join(f"{b} {n}" for b, n in sorted(counts.items(), key=lambda t: -t[1])) or "-"


def _built_kinds(models: List[Dict[str, Any]]) -> List[str]:
    kinds = list(models[0]["kinds"])
    heads = [k + (" (control)" if k in CONTROLS else "") for k in kinds]
    return ["## Flag rate", "",
            md_table(["Model", "test split (lower is better)"] + heads,
                     [[m["name"], fmt_pct(m["in_domain"]["flag_rate"], 1)] +
                      [fmt_pct(m["kinds"][k]["flag_rate"], 1) for k in kinds] for m in models]), "",
            "## AUROC (test X-rays vs kind)", "",
            md_table(["Model"] + heads, [[m["name"]] + [fmt_num(m["kinds"][k]["auroc"], 3) for k in kinds]
                                        for m in models]), "",
            "## Settings", "",
            md_table(["Model", "threshold", "val flag rate", "fit images", "val images", "rank", "shrinkage",
                      "test flag rate per label"],
                     [[m["name"], fmt_num(m["domain"]["threshold"]), fmt_pct(m["domain"]["flag_rate_validation"], 1),
                       m["domain"]["fit"]["images"], m["domain"]["calibration"]["images"], m["domain"]["rank"],
                       fmt_num(m["domain"]["shrinkage"], 3),
                       ", ".join(f"{k} {fmt_pct(v, 1)}" for k, v in m["in_domain"]["flag_rate_per_label"].items())]
                      for m in models]), ""]


def _foreign(withf: List[Dict[str, Any]], folder: Any) -> List[str]:
    if not withf:
        return []
    fk = list(withf[0]["foreign"])
    lines = [f"## Real images from other sources (`{folder}`, evaluation only)", "",
             "Each sub-folder is a kind. Flag rate at the model's threshold; AUROC: test X-rays against "
             "that kind; the branch deciding for the flagged images (count).", "",
             md_table(["Model"] + [f"{k} ({withf[0]['foreign'][k]['images']})" for k in fk],
                      [[m["name"]] + [f"{fmt_pct(m['foreign'][k]['flag_rate'], 1)} (AUROC "
                                      f"{fmt_num(m['foreign'][k]['auroc'], 3)})" for k in fk] for m in withf]), "",
             md_table(["Model"] + fk, [[m["name"]] + [_branch_counts(m["foreign"][k]["flagged_by_branch"])
                                                     for k in fk] for m in withf]), ""]
    split = [(k, src) for k in fk for src in withf[0]["foreign"][k].get("by_source", {})]
    if split:
        lines += ["Flag rate by source (`files.csv`), for kinds drawn from several: a check that "
                  "generalises flags each source alike, one that learned a source does not.", "",
                  md_table(["Model"] + [f"{k}: {src} ({withf[0]['foreign'][k]['by_source'][src]['images']})"
                                        for k, src in split],
                           [[m["name"]] + [fmt_pct(m["foreign"][k].get("by_source", {}).get(src, {}).get(
                               "flag_rate"), 1) for k, src in split] for m in withf]), ""]
    return lines + _foreign_classifier([m for m in withf if m.get("foreign_classifier")])


def _foreign_classifier(clf: List[Dict[str, Any]]) -> List[str]:
    if not clf:
        return []
    c0 = clf[0]["foreign_classifier"]
    rows = []
    for m in clf:
        for part in ("all", "not_flagged"):
            c = m["foreign_classifier"][part]
            rows.append([m["name"], "all" if part == "all" else "not flagged by the domain check",
                         c["images"], c["positives"], fmt_num(c["auc"], 3) if c["auc"] is not None else "-",
                         c["tp"], c["fp"], c["tn"], c["fn"]])
    return ["### The classifier on adult frontal X-rays (outside its population)", "",
            f"{c0['caveat'].capitalize()}: these figures say what an adult image that slipped through "
            f"would get, not how well the model reads adults. Labels: {c0['rule']}.", "",
            md_table(["Model", "subset", "n", "positive", "AUC", "TP", "FP", "TN", "FN"], rows), ""]


def _originals(witho: List[Dict[str, Any]], folder: Any) -> List[str]:
    if not witho:
        return []
    return [f"## In-domain originals through the runtime (`{folder}`)", "",
            "Kermany X-rays at their original size, decoded and resized by the runtime as a user's file is (the test "
            "split was resized offline and saved again as JPEG). A check that reacts to that pipeline rather than to "
            "the image flags these; their rate should be close to the test split's.", "",
            md_table(["Model", "images", "flagged", "test split", "AUROC vs test", "deciding branch"],
                     [[m["name"], m["originals"]["images"], fmt_pct(m["originals"]["flag_rate"], 1),
                       fmt_pct(m["in_domain"]["flag_rate"], 1), fmt_num(m["originals"]["auroc"], 3),
                       _branch_counts(m["originals"]["flagged_by_branch"])] for m in witho]), ""]


def _operating_points(with_op: List[Dict[str, Any]]) -> List[str]:
    if not with_op:
        return []
    lines = ["## Operating points: a stricter or looser check", "",
             "The same scores at other thresholds, each set to flag a share of the model's validation images "
             "(in-population X-rays it was calibrated on, never fitted on): a hospital that receives adults or other "
             "views can flag more of them in exchange for flagging more children's X-rays. `cxr-infer "
             "--domain-flag-rate R` picks a row in files that carry these points, `--domain-threshold S` in any "
             "file. The rows are set on validation images only; the other columns are measured.", ""]
    for m in with_op:
        op = m["operating_points"]
        built = [k for k in m["kinds"] if k not in CONTROLS]
        cols = [k for k in op["points"][0]["flagged"] if k not in built and k not in CONTROLS]

        def lowest(p: Dict[str, Any], built: List[str] = built) -> str:
            k = min(built, key=lambda b: p["flagged"][b])
            return f"{fmt_pct(p['flagged'][k], 1)} ({k})" if p["flagged"][k] < 1.0 else "100%"

        lines += [f"**{m['name']}** (thresholds: {op['source']})", "",
                  md_table(["validation flagged", "threshold S"] + cols + (["built kinds (lowest)"] if built else []),
                           [[fmt_pct(p.get("validation", p["flag_rate"]), 1), fmt_num(p["threshold"], 4)]
                            + [fmt_pct(p["flagged"][k], 1) for k in cols] + ([lowest(p)] if built else [])
                            for p in op["points"]]), ""]
    return lines


def _branches(branched: List[Dict[str, Any]]) -> List[str]:
    if not branched:
        return []
    names = [b["name"] for b in branched[0]["domain"]["branches"]]
    return ["## Branches", "",
            "Each branch's value is mapped to (value - centre) / scale (centre: its validation median; "
            "centre + scale: its validation 95th percentile); the score is the largest. Cells: centre / "
            "scale, and the share of validation images flagged with that branch deciding.", "",
            md_table(["Model"] + names,
                     [[m["name"]] + [f"{fmt_num(b['centre'], 3)} / {fmt_num(b['scale'], 3)}, "
                                     f"{fmt_pct(m['domain']['flagged_validation_by_branch'][b['name']], 1)}"
                                     for b in m["domain"]["branches"]] for m in branched]), ""]
