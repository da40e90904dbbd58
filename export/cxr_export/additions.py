"""The graphs ``cxr-export`` adds after the classifier, one table entry each: :data:`ADDITIONS`.

Each pairs the runtime's entry (:data:`cxr_infer.spec.GRAPH_ADDITIONS`: spec block, outputs) with
how the exporter adds it to a written file, strips it (:func:`strip_additions`) and when
``cxr-export`` runs it (:meth:`Addition.wanted`). Adding one: ``CONTRIBUTING.md``.

Examples:
    >>> ADDITIONS["domain"].outputs, ADDITIONS["heatmap"].prefix
    (('domain_score', 'domain_terms'), 'cxr_heatmap/')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from cxr_infer.spec import GRAPH_ADDITIONS, GraphAddition

from . import heatmap
from .domain import graph as domain_graph
from .onnxgraph import keep_only, strip_prefixed


@dataclass
class AddContext:
    """What ``cxr-export`` knows when it adds the graphs; ``options``: its options (argparse ``dest`` -> value)."""

    ckpt_dir: Optional[Path] = None
    data_dir: Optional[str | Path] = None
    size: Tuple[int, int] = (224, 224)
    features: bool = True
    threads: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        """Whether the training folder is known and exists."""
        return bool(self.data_dir) and Path(self.data_dir).is_dir()

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed on the first call for ``key`` and kept for the next ones."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass(frozen=True)
class Addition:
    """One graph the exporter appends after the classifier.

    Attributes:
        prefix: the prefix of every node and initializer name it adds.
        add: ``add(path, context)`` adds it to the file (replacing an earlier one); returns its spec block.
        summary: the block -> the line ``cxr-export`` prints.
        option: the ``cxr-export`` option (argparse ``dest``): True asks for it, False leaves it out.
    """

    graph: GraphAddition
    prefix: str
    add: Callable[[Path, AddContext], Dict[str, Any]]
    summary: Callable[[Dict[str, Any]], str]
    option: str
    needs_data: bool = False
    needs_features: bool = True
    #: graph inputs it adds (a switch that turns it on), removed with it
    inputs: Tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def outputs(self) -> Tuple[str, ...]:
        return tuple(self.graph.outputs)

    def strip(self, model: Any) -> None:
        """Remove this addition's nodes, initializers, outputs and inputs from ``model`` (in place)."""
        strip_prefixed(model, self.prefix, self.outputs)
        keep_only(model.graph.input, lambda i: i.name not in self.inputs)

    def wanted(self, context: AddContext) -> bool:
        """Whether ``cxr-export`` adds it (by default: when what it needs is there); ``ValueError`` if it cannot."""
        requested = context.options.get(self.option)
        if requested is False:
            return False
        if requested:
            if self.needs_data and not context.has_data:
                raise ValueError(f"--{self.option.replace('_', '-')} needs the training folder: pass --calibration DIR")
            return True
        return (context.has_data or not self.needs_data) and (context.features or not self.needs_features)


def _add_domain(path: Path, context: AddContext) -> Dict[str, Any]:
    from .domain.fit import DEFAULT_FIT_COUNT, DEFAULT_FLAG_RATE, add_domain_stats, load_sets

    options = context.options
    sets = context.once("domain_sets", lambda: load_sets(context.ckpt_dir, context.data_dir, context.size,
                                                         options.get("domain_fit_count", DEFAULT_FIT_COUNT)))
    return add_domain_stats(path, *sets, flag_rate=options.get("domain_flag_rate", DEFAULT_FLAG_RATE),
                            threads=context.threads, source=str(context.data_dir))


def _domain_summary(block: Dict[str, Any]) -> str:
    return (f"threshold {block['threshold']:.4g} (flags {block['flag_rate_validation']:.1%} of "
            f"{block['calibration']['images']} validation images; fitted on {block['fit']['images']} train images)")


def _add_heatmap(path: Path, context: AddContext) -> Dict[str, Any]:
    return heatmap.add_heatmap(path, threads=context.threads)


def _heatmap_summary(block: Dict[str, Any]) -> str:
    return f"Grad-CAM at {block['grid'][0]}x{block['grid'][1]} ({block.get('layer') or block['feature_map']})"


#: The graph additions, in the order ``cxr-export`` adds them.
ADDITIONS: Dict[str, Addition] = {a.name: a for a in (
    Addition(GRAPH_ADDITIONS["domain"], domain_graph.PREFIX, _add_domain, _domain_summary, option="domain_stats",
             needs_data=True),
    Addition(GRAPH_ADDITIONS["heatmap"], heatmap.PREFIX, _add_heatmap, _heatmap_summary, option="heatmap",
             inputs=(heatmap.SWITCH_INPUT,)),
)}


def get_addition(name: str) -> Addition:
    """The entry of ``name``; ``ValueError`` naming the choices when there is none."""
    if name not in ADDITIONS:
        raise ValueError(f"unknown graph addition {name!r}; choose from {', '.join(ADDITIONS)}")
    return ADDITIONS[name]


def strip_additions(model: Any, names: Optional[Sequence[str]] = None) -> None:
    """Remove the additions ``names`` (default: every registered one) from ``model`` (in place)."""
    for name in ADDITIONS if names is None else names:
        get_addition(name).strip(model)


def add_all(files: Sequence[Path], context: AddContext, say: Callable[[str], None]) -> None:
    """Add every wanted addition to each of ``files``, in table order, saying one line for each."""
    for addition in ADDITIONS.values():
        if not addition.wanted(context):
            continue
        for path in files:
            block = addition.add(Path(path), context)
            say(f"{addition.name}: {Path(path).name}: {addition.summary(block)}")
