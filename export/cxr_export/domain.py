"""Domain statistics: does an image lie inside the model's training domain?

Method (why this one): a Mahalanobis distance in the model's own pooled penultimate feature
space (the ``features`` output), to the nearest class mean, with one covariance shared by the
classes and shrunk towards a multiple of the identity with the Ledoit-Wolf formula. It needs
only a few statistics (no training images in the file, unlike a k-nearest-neighbour
distance), is a known strong baseline for out-of-distribution detection on penultimate
features (Lee et al. 2018), and the shrinkage keeps the inverse stable with ~1,500 images in
512 or 2,048 dimensions.

Several branches, because pooled features alone are not enough. Global average pooling throws
the image's layout away: an upside-down or heavily cropped X-ray has ordinary features
(measured on VGG16 INT8: AUROC 0.51 and 0.38 against test X-rays). And the last layer is not
the best place to see a change of population: adult chest X-rays from other hospitals are told
from the test X-rays far better by the statistics of the *intermediate* stages (texture,
exposure and edge statistics; the "feature ensemble" of Lee et al. 2018) and by the coarse
shape of the image. The branches are:

    features      the distance above on the ``features`` output (since 2026-11-29 only in
                  files without stage branches: see "Without the features branch" below)
    thumb16       the same distance on a 16 x 16 thumbnail of the model's input (an
                  AveragePool of the normalised image, 768 numbers), *standardised per image*
                  (zero mean, unit variance): layout and colour, free of the exposure and
                  contrast that vary between X-rays and would otherwise dominate the covariance
    thumb8        the same on an 8 x 8 thumbnail (192 numbers, a better-conditioned covariance)
    thumb4        the same on a 4 x 4 thumbnail (48 numbers): the overall shape of the chest in
                  the frame (an adult chest fills it differently from a 1-5 year old's)
    orientation   log d2(thumb16) - log d2(thumb16 rotated 180 degrees): how much nearer the
                  training X-rays the image lies upside down than as given (a likelihood-ratio
                  test of "is it upright?", which a distance alone answers poorly because a
                  flipped chest is still chest-like)
    stage1..      the distance on the channel means and standard deviations (means over the
                  positions of x and of x * x; 2 C numbers) of activations inside the backbone
                  (:data:`STAGE_TAPS`: the ends of its first four stages; for ResNet50 since
                  2026-11-29 two activations inside bottleneck blocks, for InceptionV3 three of
                  its stage ends; in an INT8 file the
                  quantized tensor the next layer reads, as integers, its scale folded into the
                  branch's weights, so the classifier's own nodes are untouched); a tensor taller
                  than 32 rows on every second row (:data:`DEFAULT_STAGE_TALL_ROWS`)

Measured (fitted on the train part, calibrated on val, 5% of val flagged; Kermany test split
and ``../shared/data/foreign_cxr``, the latter for measuring only, never fitted on), the four
old branches vs. these nine, VGG16 / ResNet50 / InceptionV3 INT8: adult frontal X-rays flagged
47 / 58 / 53% -> 87 / 82 / 89% (AUROC against the test X-rays 0.905 / 0.963 / 0.950 -> 0.971 /
0.981 / 0.979), lateral 92 / 100 / 92% -> 100%, CT 100%, test split 3.2 / 1.8 / 1.8% -> at
most 5%, and every kind ``cxr-bench domain`` builds still 100%. Tried and not kept: the last
stage's statistics (adds nothing to ``features``; on VGG16 INT8 the deeper stages separate
adults poorly, AUROC 0.65-0.80), a 2 x 2 grid of each stage (no better than mean and std),
log-statistics, a lower rank, a 32 x 32 thumbnail (worse: too many dimensions for 1,500
images), and the *sum* of the standardised terms instead of their largest (better on some
models for adults, but it loses upside-down and vertically flipped X-rays on VGG16 and no
longer says which test fired).

Also tried (2026-11-29, on cached statistics; measured on ``foreign_cxr`` and chosen against it,
so read these as leads, not as evidence), none of which closes the gap to 95% of adults:
k-nearest-neighbour distances instead of Mahalanobis on the same inputs (ResNet50 adults 84-91%
alone, 82% in the max), a Mahalanobis distance on the vector of branch terms (70-96%, with the
test split at up to 6%), and a small CNN trained on train images against synthetic
"adult-like" stretching and zooming of them (AUROC 0.14: adults looked *less* transformed).
One candidate looked like the answer and was a trap: the log mean absolute detail of a 2 x 2
average-pool pyramid (5 levels, a model-free texture statistic) flagged 96% of adults on its
own and 93-96% in the max. But it flagged 72% of the 160 full-size Kermany originals read
through the runtime (``../shared/data/kermany_fullres``): its signal was the finest level, where
the offline-resized, re-saved 224 px training and test JPEGs differ from any image the runtime
resizes itself. Without that level it flagged 26% of adults. ``cxr-bench domain --originals``
reports that control; every branch must keep it near the test split's rate.

Without the features branch (2026-11-29). Re-fitted copies of the three shipped files (same
split, same 1,500 fitting and 523 calibration images; ``cxr-bench domain --foreign --originals``),
the nine branches as shipped -> the eight without ``features``: adults 86.7 / 82.3 / 89.2% ->
88.0 / 81.0 / 93.0%, test split 5.1 / 3.4 / 4.0% -> 4.5 / 3.2 / 4.6%, lateral, CT and every
built kind still 100%, full-size originals 3.1-3.8%. And it is the branch an engine's integer
rounding moves most (OpenVINO moved ResNet50's by up to 0.97 of its threshold); without it the
ResNet50 copy's scores move by at most 0.04 of the threshold between the two engines on 64 test and
foreign images. Chosen after measuring on ``foreign_cxr``; nothing in a file is fitted on it.

Also tried on 2026-11-29 (cached statistics, measured on ``foreign_cxr``; leads, not evidence),
none closer to 95% of adults: fitting on fewer images (ResNet50 adults 84 / 80 / 79 / 82% with
500 / 750 / 1,000 / 1,500: more fitting images will not help); per-position Gaussians on a 7 x 7
grid of ResNet50's stage maps (PaDiM-like: 44-59% alone, no gain in the max); the *sum* of the
"population" branches (thumbnails and stages) next to the largest of the others (InceptionV3 95%,
but VGG16 68% and ResNet50 78%); every ResNet50 block end as a branch of its own (14 stage
branches: 85% against 82%). Nor would three networks together: the three checks miss different
adults (6 missed by all three, 36 by at least one), but calibrated together to flag 5% of the
validation images their union flags 85% of adults, no more than one file alone.

Each branch value ``v`` is mapped to ``(v - centre) / scale`` with ``centre`` its median and
``centre + scale`` its 95th percentile on the *validation* images (out of sample, so a branch
that overfits its fitting images gets no unfair weight), and the score is the largest of them;
``domain_terms`` ([N, branches]) holds every term, so the runtime can say which test fired.

Storage (why in the graph): the statistics become FP32 initializers of a few extra nodes
appended to the graph after ``features``, with a new output ``domain_score`` ([N]). The
runtime then needs nothing but the output name and the threshold from the spec
(``outputs.domain_score``, ``domain.threshold``), no linear algebra of its own, and the
classification path (``probabilities``) is untouched: same nodes, same weights, same numbers.

Compactness: the full inverse of a 2,048 x 2,048 covariance would add 16 MB. We keep the top
``rank`` eigenvectors of the shrunk covariance exactly and replace the remaining eigenvalues
by their mean (the probabilistic-PCA form of the covariance), so that

    d_c^2 = |z_c|^2 / s2  +  sum_i p_ci^2 (1 / l_i - 1 / s2),   z_c = f - mu_c,  p_c = V^T z_c

costs one [C, rank] matrix (2 MB at C = 2,048, rank = 256). With ``rank >= C`` it is the exact
shrunk Mahalanobis distance. A branch's distance is ``sqrt(min_c d_c^2)``.

Cost: every call pays for these nodes, whatever outputs it asks for (onnxruntime runs every node
of a graph). Measured 2026-11-29 with ``cxr-bench graphcost`` (each file against a copy without
its domain graph, both without the Grad-CAM graph, paired in one process, 3 processes; their
range was within 2 points) on the CPU provider at batch 1 with 2 threads (AMD EPYC, AVX-512 VNNI),
VGG16 / ResNet50 / InceptionV3 INT8:

    files shipped until 2026-11-29 (nine branches, a chain per branch: 201 nodes) 11.2 / 30.1 / 17.4%
    re-fitted without the features branch, same per-branch chains                10.8 / 28.2 / 15.6%
    the same statistics in the one-chain graph above (98 nodes)                    9.5 / 25.4 / 12.0%
    and read on a 28 x 28 grid (a strided MaxPool; the option is gone)           4.9 / 18.6 / 11.2%
    ResNet50 with its two bottleneck-inner taps (:data:`STAGE_TAPS`, 76 nodes)             5.9%
    stage tensors read as integers (a Cast, no DequantizeLinear; scale folded)     5.7 /  5.7 /  9.0%
    ... plus MatMul thumbnails and stage rank 128: the files shipped in 2026-11-29's
    sixth commit (another run of the same files: 6.2 / 4.7 / 9.2%)                6.6 /  5.9 /  9.1%

Seventh session (2026-11-29), the same graphcost run with 5 processes for both, sixth-commit files
against re-fitted copies (graphcost-shipped.md has the files shipped since):

    the sixth commit's files, in this run                                          7.0 /  5.4 /  8.3%
    ReduceMean reads, zero points in the centres, one Gemm for the orientation
    twin, stage tensors taller than 32 rows read on every second row
    (:data:`DEFAULT_STAGE_TALL_ROWS`), InceptionV3 without its second stem
    max-pool (:data:`STAGE_TAPS`)                                                  4.0 /  3.8 /  5.9%

on OpenVINO (``--device openvino``, 3 processes): 5.6 / 7.1 / 16.0% -> 4.0 / 6.5 / 13.6%. The runtime
turns thread spinning off (``cxr_infer.model.SESSION_CONFIG``), and graphcost times the runtime's
sessions: there every node that onnxruntime splits between threads wakes the other thread, so the
check costs more than with spinning (InceptionV3, a random-statistics copy timed both ways: 8.7% without
spinning, 7.2% with). A tiny node costs about 1 us (100 chained Adds on [1, 16] after the classifier:
1.2%), so most of what remains is the stage reads and the projections' weights, not the node count.

Where the cost went (onnxruntime's profiler, VGG16): a DequantizeLinear the check adds beside a
fused quantized convolution that reads the same tensor is slow. Reading the uint8 tensor through a
Cast and folding the activation's scale into the branch's weights took VGG16's four stage reads
from about 1.2 ms to 0.6 ms of profiled time (the DequantizeLinear itself, the square and means,
and transposes onnxruntime added). What remains is spread over ~110 small nodes (a few microseconds
each) and the projections (read per call: [2 C, 130] per stage branch, [768, 258] for the 16 x 16
thumbnail). Tried and not kept: ``GlobalLpPool`` or ``ReduceSumSquare`` for the second moment
(slower than Mul + mean), per-channel sums of squares as batched integer MatMuls (slower),
subsampling the largest stage tensor on a 56 x 56 grid (a strided MaxPool costs what it saves), rank
64 (one of 12 laterals missed). Rank 128 for the stage branches flagged the same share of every
foreign_cxr kind and of the test split as rank 256 (cached statistics).

A file serves every engine, so the graph is chosen on two. Reading the uint8 tensor channels-last
(a Transpose that cancels the one onnxruntime inserts for an NCHW reader of its NHWC activations,
then [1, HW] x [N, HW, C] MatMuls for the averages) was cheaper on onnxruntime's CPU provider
(graphcost, VGG16 / ResNet50 / InceptionV3: 5.8 / 4.1 / 7.2% against 6.2 / 4.7 / 9.2% for the
NCHW Cast and GlobalAveragePool kept here) but OpenVINO ran it badly (27.9 / 10.1 / 25.5% against
5.6 / 8.2 / 17.4%; the files shipped before, with their DequantizeLinear reads: 10.2 / 30.1 / 28.4%).
A lead for OpenVINO (its profiler, PERF_COUNT, on the shipped InceptionV3, 2026-11-29): the domain
nodes themselves take 443 us of 5.8 ms; most of the rest is the classifier side, where the check's
Casts run as reference kernels (Convert ref_f32 and ref_I8: 203 us against 21 us without the check)
(a guess at why: OpenVINO folds each Q/DQ pair into a FakeQuantize and must now also materialise the uint8
tensor). A read that OpenVINO fuses, without giving up onnxruntime's gain, is not found yet: a
DequantizeLinear with scale 1 and zero point 0 in place of the Cast was no better on OpenVINO
(17.8% against 16.9% on InceptionV3) and worse on onnxruntime (12.0% against 9.9%).

Also tried on 2026-11-29 (fifth session; cached statistics of the shipped files, measured on
``foreign_cxr``: leads, not evidence), none nearer 95% of adults on every model: channel
correlations (Gram matrices, Sastry & Oore 2020) of VGG16's first two stages instead of or beside
their means and standard deviations (alone 78-79% of adults against 71-80%, 87-88% in the max);
other coarse layouts of the input (3 x 3: 87% alone, 3 x 4: 91%; row and column profiles; a
7 x 7 layout of edge strength: 83%) in place of or beside the 4 x 4 thumbnail (VGG16 85-91%,
ResNet50 76-85%, InceptionV3 89-96%, moving by a few images either way: noise at 158 images);
oriented second-derivative energy per cell (rib direction: 59-71% alone); Fisher's, Stouffer's and
top-k combinations of the branch terms instead of their largest (AUROC up by 0.005, flag rate at
5% of validation not: VGG16 78-85%, ResNet50 82-85%, InceptionV3 91-94%). Several sessions of such
measurements put the image check's ceiling with Kermany-only fitting near 88-93% of these adults;
the missed ones (VGG16: 13 of Actualmed's 54) are tightly framed adult chests whose layout and
texture fall inside the children's range.

Eighth session (2026-11-29; cached statistics of the shipped files, measured on ``foreign_cxr``: leads,
not evidence), neither nearer 95% of adults: each stage's channel *maxima* beside the means and
standard deviations (VGG16 adults 90.5% against 89.2%, but 45% of the full-size originals flagged:
the maximum sees the resize pipeline, as the finest pyramid level did) or a kurtosis per channel
(77.8%); and a likelihood ratio against a "background" fitted on 3,000 augmented train images
(random crops of 45-100% of the area, aspect 0.7-1.4, rotation up to 12 degrees, gamma 0.6-1.6), the
distance to the training images minus the distance to the background (Ren et al. 2019), per branch
or beside them: 80-91%; each term scaled by its 90th or 99th validation percentile instead of the 95th
(57-94%), one Gaussian over all stage statistics together (84-89% with the thumbnails), or one
Gaussian per stage instead of the nearest of two class means (89.2 / 89.9 / 94.9%: within an image or
two). The missed adults lie near the threshold, not deep inside: VGG16 / ResNet50 /
InceptionV3 flag 94.3 / 96.2 / 98.7% of them with the threshold set to flag 10% of the validation
images and 97.5 / 98.7 / 99.4% at 15% (the test split: 8.5 / 7.1 / 7.4% and 12.7 / 11.9 / 13.8%),
which is why a file now carries its ``operating_points`` and the runtime lets a site choose one.
InceptionV3's cost (random-statistics timing copies, 5 paired processes, 6.3% as shipped): its 25-row
Mixed_5d tensor on every second row 6.0%, plus rank 32 for Mixed_6e 6.2%, plus rank 128 for the
16 x 16 thumbnail 5.3%, for one adult fewer on cached statistics (93.7% against 94.3%); not shipped.
Without its Mixed_5d tensor (two stage tests: the stem max-pool and Mixed_6e) it cost 4.7% against
6.9% in another paired run (OpenVINO 9.8% against 13.3%), but a file re-fitted that way (same split
and images; ``cxr-bench domain``) flagged 88.6% of the adults against the shipped file's 94.3% (test
split 4.0%, every lateral, CT and built kind), so it was not shipped (the rule, set before measuring:
no adult fewer than the shipped file). (A first look at cached statistics had read the wrong tensors
and promised no loss; read right, they give the same 88.6%.)

Fitting and calibration: statistics are fitted on up to ``fit_count`` class-balanced images of
the *train* part of the run's split, through the model file itself (so an INT8 file gets
statistics of its own, quantized features); centres, scales and the threshold come from the
*val* part, the threshold being the (1 - ``flag_rate``) quantile of the graph's scores there,
so about ``flag_rate`` of in-domain images are flagged. The test split is never read.

Standalone use, to add (or refresh) statistics in an existing model file::

    python -m cxr_export.domain runs/gpu2/vgg16 runs/export/vgg16_int8.onnx --data .data/train

Example:
    >>> block = add_domain_stats("m.onnx", train_px, train_y, val_px, "m_dom.onnx")   # doctest: +SKIP
    >>> block["threshold"], block["flag_rate_validation"]                            # doctest: +SKIP
    (1.31, 0.05)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.model import graph_input
from cxr_infer.spec import ModelSpec

from .modelio import open_model, read_spec, spec_without_graphs, write_spec

DOMAIN_OUTPUT = "domain_score"
#: [N, branches]: each branch's standardised term, so the runtime can say which test fired
TERMS_OUTPUT = "domain_terms"
PREFIX = "cxr_domain/"
METHOD = ("max of branches, each standardised on validation (median 0, 95th percentile 1): Mahalanobis "
          "distance on a per-image standardised 16x16, 8x8 and 4x4 input thumbnail, an upright-vs-180-degrees "
          "log-likelihood ratio on the 16x16 thumbnail, on the channel means and standard deviations of "
          "activations inside the backbone (stage_tensors), and on the pooled features where the file has that "
          "branch (see branches); class means, shared Ledoit-Wolf-shrunk covariance, top-rank eigenvectors exact "
          "+ mean tail")
DEFAULT_FIT_COUNT = 1500
DEFAULT_RANK = 256
#: the rank of a stage branch: its 2 C channel statistics need fewer exact eigenvectors (measured on
#: cached statistics of the three shipped files, 2026-11-29: rank 128 flags the same share of every
#: foreign_cxr kind and of the test split as 256), and its [2 C, rank] projection is read on every call
DEFAULT_STAGE_RANK = 128
#: a stage tensor taller than this many rows is read on every second row (every column; :func:`stage_nodes`):
#: the early, high-resolution ones, whose neighbouring rows say much the same. Measured 2026-11-29 on cached
#: statistics of the shipped files (fitted and calibrated as the exporter does; foreign_cxr measured only):
#: VGG16 (its first two stage ends, 112 and 56 rows) flagged 89.2% of adults instead of 88.6%, 5.0% of the
#: test split instead of 4.8%; InceptionV3 (its first stem max-pool, 54 rows) 94.3% instead of 93.0% (with
#: its three taps), 4.2% of the test split; every lateral, CT and built kind still. Every second row of
#: *every* tensor lost a lateral on ResNet50 (its taps are 28 and 14 rows: untouched here); every fourth
#: row of VGG16's first stage lost one too.
DEFAULT_STAGE_TALL_ROWS = 32
DEFAULT_FLAG_RATE = 0.05
THUMB = 16          # thumbnail side of the layout branch
THUMB_COARSE = 8    # and of the coarse one
THUMB_COARSEST = 4  # and of the coarsest one (the overall shape of the chest: 48 numbers)
THUMB_GRIDS = (THUMB, THUMB_COARSE, THUMB_COARSEST)
#: stage outputs whose channel means and standard deviations get a branch each, per backbone (the
#: torch-export tensor names; in an INT8 QDQ file the branch reads the DequantizeLinear output that the
#: next layer reads). VGG16 and InceptionV3, by rule: the end of each of the first four stages (VGG16: the
#: max-pool closing blocks 1 to 4; InceptionV3: the two stem max-pools, Mixed_5d and Mixed_6e; the last
#: stage is what the pooled features summarise). ResNet50, since 2026-11-29: two activations *inside*
#: bottleneck blocks, layer2.3.conv1 (128 x 28 x 28) and layer3.1.conv2 (256 x 14 x 14), after ReLU.
#: Chosen among its 40 activations of the stem and layers 1-3 (each alone, flag rate at 5% of
#: validation) by the flag rate on foreign_cxr's Actualmed adults, the two best, and checked on its
#: *other* adult source, the case reports, which the choice did not see: 85% -> 89% flagged there
#: against the four stage ends (chosen the other way round, Actualmed went 76% -> 85%). With them a
#: re-fitted ResNet50 file flagged 88.0% of all adults (81.0% with the stage ends), 3.4% of the test
#: split, every lateral, CT and built kind, and the check cost 5.9% instead of 23.9% (cxr-bench
#: graphcost): inner activations have a quarter of a block end's channels. The same search on VGG16
#: and InceptionV3 found nothing that held on the other source, so they keep the rule, except that
#: InceptionV3 lost its second stem max-pool (192 x 25 x 25) on 2026-11-29 (seventh session): without
#: it the cached statistics of the shipped file flagged the same 93.0% of adults, 4.2% of the test
#: split instead of 5.0%, and every lateral, CT and built kind, and the check costs about a point
#: less (a cost choice made on measurements that include foreign_cxr). Its Mixed-block outputs
#: (Concat_2, Concat_7) cost most on OpenVINO, which materialises their uint8 tensors with reference
#: Convert kernels for the check (74 and 44 us of its profile), so the ResNet50 search was repeated on
#: 65 conv outputs inside Mixed_5b to Mixed_6e (seventh session): the two best on Actualmed alone
#: (Relu_7, Relu_9: 96 and 94% of its adults each) with the stem max-pool and the thumbnails flagged
#: 91.1% of adults (case reports, which the choice did not see: 91.3%) against 94.3% (95.2%) with
#: the Mixed-block outputs, so they were not taken.
STAGE_TAPS: Dict[str, Tuple[str, ...]] = {
    "vgg16": ("/features.4/MaxPool_output_0", "/features.9/MaxPool_output_0", "/features.16/MaxPool_output_0",
              "/features.23/MaxPool_output_0"),
    "resnet50": ("/relu_19/Relu_output_0", "/relu_26/Relu_output_0"),
    "inception_v3": ("/maxpool1/MaxPool_output_0", "/Concat_2_output_0", "/Concat_7_output_0"),
}
STD_EPS = 1e-6      # added to a thumbnail's variance before dividing (a flat image stays finite)
LOG_EPS = 1e-6      # added to squared distances before the orientation branch's logarithm
CENTRE_Q, SCALE_Q = 0.5, 0.95
#: the validation flag rates whose thresholds a file carries (``domain.operating_points``), besides its own
OPERATING_RATES = (0.01, 0.02, 0.03, 0.05, 0.075, 0.10, 0.15, 0.20, 0.25, 0.30)
#: the largest change of an FP16 file's probabilities accepted when the graph is added (on a CPU; see
#: add_domain_stats): the bound FP16 files are held to against FP32 (tests/test_export.py)
FP16_TOLERANCE = 5e-3


@dataclass
class DomainStats:
    """What the graph needs: class means [K, C], eigenvectors [C, r], eigenvalues [r], tail variance."""

    means: np.ndarray
    vectors: np.ndarray
    eigenvalues: np.ndarray
    tail_variance: float
    shrinkage: float
    n_images: int

    def d2(self, feats: np.ndarray) -> np.ndarray:
        """Squared distance to the nearest class mean (float64): what the graph computes."""
        f = np.asarray(feats, np.float64)
        best = None
        for mu in self.means.astype(np.float64):
            z = f - mu
            p = z @ self.vectors.astype(np.float64)
            d2 = (z * z).sum(1) / self.tail_variance + (p * p) @ (1.0 / self.eigenvalues - 1.0 / self.tail_variance)
            best = d2 if best is None else np.minimum(best, d2)
        return np.maximum(best, 0.0)


@dataclass
class Branch:
    """One term of the score: ``(value - centre) / scale``.

    ``kind`` "distance": ``value = sqrt(d2(x))``; "orientation": ``value = log(d2(x) + eps) -
    log(d2(rot180(x)) + eps)``. ``source`` is a graph output name (the features),
    ``"thumbnail"`` with ``grid`` its side, or ``"stage"`` with ``tensor`` the 4-D graph tensor
    whose channel means and standard deviations (``[N, 2 C]``) are the branch's input, read on every
    ``row_step``-th row (:func:`stage_feature_nodes`).
    """

    name: str
    kind: str
    source: str
    stats: DomainStats
    grid: int = 0
    centre: float = 0.0
    scale: float = 1.0
    tensor: str = ""
    row_step: int = 1

    def values(self, x: np.ndarray) -> np.ndarray:
        """The raw branch value for inputs ``x`` [N, C] (features, or standardised thumbnails)."""
        if self.kind == "distance":
            return np.sqrt(self.stats.d2(x))
        if self.kind == "orientation":
            return np.log(self.stats.d2(x) + LOG_EPS) - np.log(self.stats.d2(rotate180(x, self.grid)) + LOG_EPS)
        raise ValueError(f"unknown branch kind {self.kind!r}")

    def describe(self, model_input: str) -> Dict[str, Any]:
        src = (f"{self.grid}x{self.grid} thumbnail (AveragePool) of {model_input}, standardised per image"
               if self.source == "thumbnail" else
               f"channel means and standard deviations of {self.tensor}"
               + (f", read on one row in {self.row_step}" if self.row_step > 1 else "")
               if self.source == "stage" else self.source)
        return {"name": self.name, "kind": self.kind, "input": src, "dim": int(self.stats.means.shape[1]),
                "rank": int(self.stats.vectors.shape[1]), "shrinkage": self.stats.shrinkage,
                "tail_variance": self.stats.tail_variance, "centre": self.centre, "scale": self.scale}


def rotate180(x: np.ndarray, grid: int) -> np.ndarray:
    """Flattened [N, 3 * g * g] thumbnails turned upside down (180 degrees)."""
    n = len(x)
    return x.reshape(n, -1, grid, grid)[:, :, ::-1, ::-1].reshape(n, -1)


def pool_kernel(spec: ModelSpec, grid: int) -> Tuple[int, int]:
    """The AveragePool kernel (= stride) that turns the model's input into a ``grid`` x ``grid`` thumbnail."""
    w, h = spec.image_size
    return max(1, h // grid), max(1, w // grid)


def standardise(x: np.ndarray) -> np.ndarray:
    """Each row to zero mean and unit variance (what the graph does to a thumbnail)."""
    x = x - x.mean(1, keepdims=True)
    return x / np.sqrt((x * x).mean(1, keepdims=True) + STD_EPS)


def thumbnails(spec: ModelSpec, pixels: np.ndarray, grid: int = THUMB) -> np.ndarray:
    """What the graph's AveragePool and standardisation make of the input: [N, 3 * grid * grid]."""
    kh, kw = pool_kernel(spec, grid)
    out = []
    for i in range(0, len(pixels), 64):
        x = graph_input(spec, pixels[i:i + 64]).astype(np.float32)
        n, c, h, w = x.shape
        oh, ow = h // kh, w // kw
        t = x[:, :, :oh * kh, :ow * kw].reshape(n, c, oh, kh, ow, kw).mean(axis=(3, 5))
        out.append(t.reshape(n, -1).astype(np.float64))
    t = np.concatenate(out) if out else np.zeros((0, 3 * grid * grid))
    return standardise(t)


def ledoit_wolf(x: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """Sample covariance of centred rows ``x``, the Ledoit-Wolf shrinkage and the target's scale.

    The shrunk covariance is ``(1 - a) S + a m I`` with ``m = trace(S) / C`` (the same
    estimate as ``sklearn.covariance.ledoit_wolf`` with ``assume_centered=True``).
    """
    n, c = x.shape
    s = x.T @ x / n
    m = float(np.trace(s)) / c
    delta = max(float((s * s).sum()) / c - m * m, 0.0)
    x2 = (x * x).sum(1)
    beta = (float((x2 * x2).sum()) / n - float((s * s).sum())) / (c * n)
    beta = min(max(beta, 0.0), delta)
    a = 0.0 if delta == 0.0 else beta / delta
    return s, a, m


def fit_stats(feats: np.ndarray, labels: np.ndarray, rank: int = DEFAULT_RANK) -> DomainStats:
    """Class means and the shrunk shared covariance (top ``rank`` eigenpairs + mean tail) of ``feats``."""
    f = np.asarray(feats, np.float64)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    if len(f) < 2 or not classes:
        raise ValueError("domain statistics need at least two feature rows")
    means = np.stack([f[labels == k].mean(0) for k in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    s, a, m = ledoit_wolf(centred)
    lam, vec = np.linalg.eigh(s)
    lam, vec = lam[::-1], vec[:, ::-1]
    shrunk = (1.0 - a) * np.maximum(lam, 0.0) + a * m
    floor = max(1e-12, 1e-9 * float(shrunk[0]))
    shrunk = np.maximum(shrunk, floor)
    r = int(min(rank, f.shape[1]))
    tail = float(shrunk[r:].mean()) if r < f.shape[1] else float(shrunk[-1])
    return DomainStats(means=means.astype(np.float32), vectors=np.ascontiguousarray(vec[:, :r], np.float32),
                       eigenvalues=shrunk[:r].astype(np.float64), tail_variance=tail, shrinkage=float(a),
                       n_images=int(len(f)))


def run_outputs(model_path: str | Path, spec: ModelSpec, pixels: np.ndarray, names: List[str], batch_size: int = 32,
                threads: int = 0) -> List[np.ndarray]:
    """The graph outputs ``names`` (float64) for uint8 NHWC ``pixels``, through the runtime's model layer."""
    outs = open_model(model_path, threads, spec).run(pixels, names, batch_size)
    return [np.asarray(v, np.float64) for v in outs]


def strip_domain_graph(model) -> None:
    """Remove nodes, initializers and output added by :func:`add_domain_graph` (in place)."""
    from .modelio import strip_added_nodes

    strip_added_nodes(model, PREFIX, (DOMAIN_OUTPUT, TERMS_OUTPUT))


def resolve_tap(model, tensor: str) -> str:
    """The tensor a stage branch reads for ``tensor``: in a QDQ graph the output of the
    DequantizeLinear that follows its QuantizeLinear (what the next layer reads, so the classifier's
    own nodes keep their single consumer); otherwise ``tensor`` itself."""
    g = model.graph
    known = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    if tensor not in known:
        raise ValueError(f"the graph has no tensor {tensor!r} for a stage branch")
    for q in g.node:
        if q.op_type == "QuantizeLinear" and q.input[0] == tensor:
            for d in g.node:
                if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]:
                    return d.output[0]
    return tensor


def _inferred_type(model, tensor: str) -> Any:
    """``tensor``'s type (an ONNX ``TypeProto.Tensor``) by shape inference; None when unknown or
    when the graph cannot be inferred."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        return None
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type
    return None


def tensor_elem_type(model, tensor: str) -> int:
    """The ONNX element type of ``tensor`` (declared, or by shape inference; FLOAT when unknown)."""
    from onnx import TensorProto

    g = model.graph
    for v in list(g.value_info) + list(g.output) + list(g.input):
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    inferred = _inferred_type(model, tensor)
    return inferred.elem_type if inferred is not None else TensorProto.FLOAT


def stage_feature_nodes(model, tensor: str, key: str, row_step: int = 1) -> Tuple[List[Any], str]:
    """FP32 nodes computing ``[N, 2 C]``: the channel means and standard deviations of ``tensor``
    (an FP16 file's tensor is cast to FP32 first, so the statistics and the distances stay FP32).

    In an INT8 QDQ file whose DequantizeLinear has one scale and zero point (an activation), the
    nodes read the *quantized* tensor ``q`` through a Cast and map its statistics exactly to those of
    ``s (q - z)``: mean ``s (mean_q - z)``, standard deviation ``s sd_q`` (equal to the dequantized
    tensor's up to float rounding: within 1e-3 of the DequantizeLinear path on the three shipped
    backbones' terms). A DequantizeLinear the check adds runs beside the fused classifier node that
    also reads it; a Cast is far cheaper in onnxruntime (measured 2026-11-29 on a uint8 tensor the
    size of VGG16's first stage end, 64 x 112 x 112: 0.76 ms for a DequantizeLinear and the means of
    x and x * x, 0.44 ms with a Cast).

    ``row_step`` > 1 reads every ``row_step``-th row of the tensor, every column (a Slice of whole
    rows, of the *quantized* tensor in an INT8 file; see :func:`stage_nodes`): the statistics are then
    those of those rows, fitted and calibrated the same way.
    """
    from onnx import helper, numpy_helper

    nodes, feat, affine = stage_nodes(model, tensor, key, row_step)
    if affine is not None:  # integer units -> the dequantized tensor's: s ([mean_q, sd_q] - [z, 0])
        scale, offset = affine
        model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), key + "scale"))
        model.graph.initializer.append(numpy_helper.from_array(offset.astype(np.float32), key + "offset"))
        nodes.append(helper.make_node("Sub", [feat, key + "offset"], [key + "feat_z"], name=key + "feat_z"))
        nodes.append(helper.make_node("Mul", [key + "feat_z", key + "scale"], [key + "feat_x"], name=key + "feat_x"))
        feat = key + "feat_x"
    return nodes, feat


def stage_nodes(model, tensor: str, key: str, row_step: int = 1
                ) -> Tuple[List[Any], str, Optional[Tuple[float, np.ndarray]]]:
    """:func:`stage_feature_nodes` before its last step: ``(nodes, feat, affine)``. ``affine`` is None
    when ``feat`` is in the tensor's units; otherwise ``feat`` holds the means and standard deviations
    of the quantized integers ``q`` and ``affine = (s, offset)``, with ``s (feat - offset)`` those of
    the dequantized tensor (``offset``: the zero point for each mean, 0 for each standard deviation),
    an affine map :func:`add_domain_graph` folds into its centres and weights."""
    from onnx import TensorProto, helper, numpy_helper

    x = resolve_tap(model, tensor)
    nodes: List[Any] = []

    def node(op: str, ins: List[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [key + out], name=key + out, **kw))
        return key + out

    fp16 = tensor_elem_type(model, x) == TensorProto.FLOAT16
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == x), None) \
        if x != tensor else None
    affine = _per_tensor_affine(model, dq)  # (scale, zero point) where the quantized tensor can be read instead
    if affine is not None:
        x = dq.input[0]
    if row_step > 1:
        # every row_step-th row, all columns: a Slice copying whole rows (of the integers in an INT8 file),
        # which onnxruntime runs far faster than a strided MaxPool (measured 2026-11-29, uint8 [1, 64, 54, 54]
        # read through a Cast, both moments, no thread spinning: 50 us with every 2nd row, 72 us for every
        # row, 127 us with every 2nd row and column by MaxPool, 63 us by a Slice on both axes)
        big = np.iinfo(np.int64).max
        for name, value in (("rows_start", [0]), ("rows_end", [big]), ("rows_axis", [2]), ("rows_step", [row_step])):
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), key + name))
        x = node("Slice", [x, key + "rows_start", key + "rows_end", key + "rows_axis", key + "rows_step"], "rows")
    if affine is not None:
        # the quantized integers q through a Cast: far cheaper in onnxruntime than a DequantizeLinear
        # of the check's own beside the fused convolution that reads the same tensor. The statistics
        # are those of q - z; s times them are the dequantized tensor's.
        x = node("Cast", [x], "q32", to=TensorProto.FLOAT)
    elif fp16:
        x = node("Cast", [x], "x32", to=TensorProto.FLOAT)
    # ReduceMean over the positions (one node, [N, C]): cheaper in onnxruntime than GlobalAveragePool
    # and a Flatten (measured 2026-11-29 on a uint8 [1, 64, 54, 54] tensor read through a Cast, both
    # moments: 71 against 90 us without thread spinning, 44 against 53 us with it)
    if _opset(model) >= 18:
        model.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), key + "axes"))
        mean = node("ReduceMean", [x, key + "axes"], "mean", keepdims=0)
        msq = node("ReduceMean", [node("Mul", [x, x], "x2"), key + "axes"], "msq", keepdims=0)
    else:
        mean = node("ReduceMean", [x], "mean", axes=[2, 3], keepdims=0)
        msq = node("ReduceMean", [node("Mul", [x, x], "x2")], "msq", axes=[2, 3], keepdims=0)
    var = node("Relu", [node("Sub", [msq, node("Mul", [mean, mean], "mean2")], "var0")], "var")
    feat = node("Concat", [mean, node("Sqrt", [var], "sd")], "feat", axis=1)
    if affine is None:
        return nodes, feat, None
    scale, zero = affine
    channels = _channels(model, tensor)
    if channels is None:
        raise ValueError(f"the channel count of stage tensor {tensor!r} is not known (shape inference failed)")
    return nodes, feat, (scale, np.concatenate([np.full(channels, zero), np.zeros(channels)]))


def _dims(model, tensor: str) -> List[int]:
    """``tensor``'s dimensions by shape inference (0 for an unknown one; [] when the shape is unknown)."""
    inferred = _inferred_type(model, tensor)
    return [d.dim_value for d in inferred.shape.dim] if inferred is not None else []


def _channels(model, tensor: str) -> Optional[int]:
    """The channel count (dimension 1) of 4-D ``tensor``, by shape inference; None when unknown."""
    dims = _dims(model, tensor)
    return dims[1] if len(dims) == 4 and dims[1] > 0 else None


def _per_tap(row_step: int | Sequence[int], count: int) -> List[int]:
    """One row step per stage tensor: ``row_step`` for each of ``count``, or the sequence as given."""
    return [row_step] * count if isinstance(row_step, int) else list(row_step)


def stage_row_steps(model_path: str | Path, tensors: Sequence[str], tall_rows: int) -> List[int]:
    """Every how many rows each stage tensor is read: 2 for one taller than ``tall_rows`` rows, else 1 (and
    where its height is unknown; all 1 when ``tall_rows`` is 0)."""
    if tall_rows <= 0 or not tensors:
        return [1] * len(tensors)
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [2 if len(dims) == 4 and dims[2] > tall_rows else 1 for dims in (_dims(model, t) for t in tensors)]


def _per_tensor_affine(model, dq) -> Optional[Tuple[float, float]]:
    """``(scale, zero point)`` of a per-tensor DequantizeLinear ``dq`` whose scale and zero point are
    initializers (an INT8 file's activations); None otherwise (no ``dq``, per-channel or computed)."""
    if dq is None:
        return None
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if dq.input[1] not in inits or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits):
        return None
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1:
        return None
    return float(scale.reshape(())), float(zero.reshape(()))


def stage_features(model_path: str | Path, spec: ModelSpec, pixels: np.ndarray, tensors: List[str],
                   batch_size: int = 32, threads: int = 0,
                   row_step: int | Sequence[int] = 1) -> List[np.ndarray]:
    """Each stage branch's input ``[N, 2 C]`` for ``pixels``, computed by the same nodes the domain
    graph appends (run on a copy of the file with those nodes as extra outputs; ``row_step``, one for
    all tensors or one per tensor, as in :func:`stage_feature_nodes`)."""
    import onnx
    from onnx import TensorProto, helper

    if not tensors:
        return []
    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    spec = spec_without_graphs(spec, domain=True)  # the probe has no domain outputs, whatever the spec says
    names = []
    for i, (t, step) in enumerate(zip(tensors, _per_tap(row_step, len(tensors)))):
        nodes, feat = stage_feature_nodes(model, t, f"{PREFIX}probe{i + 1}/", step)
        model.graph.node.extend(nodes)
        model.graph.output.append(helper.make_tensor_value_info(feat, TensorProto.FLOAT, None))
        names.append(feat)
    from cxr_infer.model import ModelFile

    m = ModelFile(model.SerializeToString(), threads=threads or None, spec=spec)
    return [np.asarray(v, np.float64) for v in m.run(pixels, names, batch_size)]


def default_taps(spec: ModelSpec, model_path: str | Path) -> List[str]:
    """The stage tensors of :data:`STAGE_TAPS` for this file's backbone that its graph has (none for
    other backbones: they get the thumbnail and features branches only)."""
    import onnx

    wanted = STAGE_TAPS.get(spec.backbone, ())
    if not wanted:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    known = {o for n in model.graph.node for o in n.output}
    return [t for t in wanted if t in known]


def _opset(model) -> int:
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [13])


def add_domain_graph(model_path: str | Path, branches: List[Branch], out_path: Optional[str | Path] = None,
                     kernels: Optional[Dict[int, Tuple[int, int]]] = None) -> Path:
    """Append the FP32 nodes computing ``domain_score`` [N] = max over ``branches``; write the file.

    ``kernels`` maps a thumbnail grid to its AveragePool kernel (default: 224 / grid). Any
    earlier domain graph is replaced; nothing else changes.

    One chain serves every branch: at batch 1 the check's cost is tensor reads and per-node
    dispatch more than arithmetic (measured: 2 to 4 points of the classifier's time fewer than a
    chain of ~15 nodes per branch, module docstring). Each
    distinct (input, statistics) pair ``j`` (the orientation branch shares its upright one with the
    16 x 16 distance branch) is centred on the mean ``m`` of its class means, ``u = x - m``; then

        d2_jc = |u|^2 / s2  +  sum_i p_i^2 w_i  +  u . a_c  +  k_c,     p = V^T u

    with ``w_i = 1 / l_i - 1 / s2``, ``a_c = -2 (d_c / s2 + V (w * V^T d_c))``, ``k_c = |d_c|^2 / s2
    + sum_i (V^T d_c)_i^2 w_i`` and ``d_c = mu_c - m``: :meth:`DomainStats.d2` expanded around
    ``m`` (close to every class mean, so float32 keeps the digits). One Gemm per pair gives ``[p,
    u . a_c + k_c]``; three MatMuls give every pair's and class's ``d2``, one ReduceMin the nearest
    class, and two MatMuls the standardised terms (``sqrt`` for a distance branch, the log-ratio
    for orientation), whose largest is the score.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    graph = model.graph
    outputs = [o.name for o in graph.output]
    opset = _opset(model)
    prefix = PREFIX
    nodes: List[Any] = []
    inits: Dict[str, np.ndarray] = {prefix + "axis1": np.array([1], np.int64),
                                    prefix + "axis2": np.array([2], np.int64),
                                    prefix + "axes123": np.array([1, 2, 3], np.int64),
                                    prefix + "std_eps": np.array(STD_EPS, np.float32),
                                    prefix + "log_eps": np.array(LOG_EPS, np.float32)}

    def node(op: str, ins: List[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    def reduce(op: str, x: str, axes: str, out: str, keepdims: int) -> str:
        if opset >= 18:
            return node(op, [x, prefix + axes], out, keepdims=keepdims)
        return node(op, [x], out, axes=inits[prefix + axes].tolist(), keepdims=keepdims)

    x32: List[str] = []  # the graph input as FP32, made once if a thumbnail needs it
    pooled: Dict[int, str] = {}  # grid -> raw [N, 3, grid, grid] average
    thumbs: Dict[int, str] = {}  # grid -> standardised, flattened [N, 3 grid grid]
    def kernel(grid: int) -> Tuple[int, int]:
        return tuple((kernels or {}).get(grid, (224 // grid, 224 // grid)))

    def pool(grid: int) -> str:
        if grid in pooled:
            return pooled[grid]
        fine = next((g for g in sorted(pooled) if g > grid and g % grid == 0 and
                     kernel(grid) == tuple(k * (g // grid) for k in kernel(g))), None)
        if fine is not None:  # nested blocks: the coarse thumbnail is an average of the fine one (no input read)
            k = [fine // grid] * 2
            pooled[grid] = node("AveragePool", [pooled[fine]], f"{prefix}thumb{grid}/pooled", kernel_shape=k, strides=k)
            return pooled[grid]
        if not x32:
            x = graph.input[0].name
            fp32 = graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
            x32.append(x if fp32 else node("Cast", [x], prefix + "x32", to=TensorProto.FLOAT))
        k = list(kernel(grid))
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] >= k[0] and dims[3] >= k[1]:
            # the block averages as two MatMuls, rows then columns ([oh, H] x (x [N, C, H, W] x [W, ow])):
            # the same sums as AveragePool, which onnxruntime ran slower on the input (profiled on
            # InceptionV3, 2026-11-29: 65 us against 47 us for the two MatMuls)
            names = f"{prefix}thumb{grid}/"
            rows = np.kron(np.eye(dims[2] // k[0]), np.full((1, k[0]), 1.0 / k[0]))
            cols = np.kron(np.eye(dims[3] // k[1]), np.full((k[1], 1), 1.0 / k[1]))
            inits[names + "rows"] = np.pad(rows, ((0, 0), (0, dims[2] - rows.shape[1]))).astype(np.float32)
            inits[names + "cols"] = np.pad(cols, ((0, dims[3] - cols.shape[0]), (0, 0))).astype(np.float32)
            pooled[grid] = node("MatMul", [names + "rows", node("MatMul", [x32[0], names + "cols"], names + "pooled_w")],
                                names + "pooled")
        else:
            pooled[grid] = node("AveragePool", [x32[0]], f"{prefix}thumb{grid}/pooled", kernel_shape=k, strides=k)
        return pooled[grid]

    def thumbnail(grid: int) -> str:
        """The standardised, flattened [N, 3 grid grid] thumbnail of the graph input."""
        if grid not in thumbs:
            names = f"{prefix}thumb{grid}/"
            x = pool(grid)
            centred = node("Sub", [x, reduce("ReduceMean", x, "axes123", names + "mean", 1)], names + "centred")
            var = reduce("ReduceMean", node("Mul", [centred, centred], names + "sq"), "axes123", names + "var", 1)
            sd = node("Sqrt", [node("Add", [var, prefix + "std_eps"], names + "var_eps")], names + "sd")
            thumbs[grid] = node("Flatten", [node("Div", [centred, sd], names + "std")], names + "flat", axis=1)
        return thumbs[grid]

    for grid in sorted({br.grid for br in branches if br.source == "thumbnail"}, reverse=True):
        pool(grid)  # finest first, so coarser ones can average it

    stages: Dict[str, str] = {}  # tensor -> its [N, 2C] channel means and standard deviations
    units: Dict[str, Tuple[float, np.ndarray]] = {}   # such an input in quantized units -> (scale, offset)

    def stage(tensor: str, row_step: int) -> str:
        if tensor not in stages:
            new_nodes, feat, affine = stage_nodes(model, tensor, f"{prefix}stage{len(stages) + 1}/", row_step)
            nodes.extend(new_nodes)
            stages[tensor] = feat
            if affine is not None:
                units[feat] = affine
        return stages[tensor]

    # every distinct (input tensor, statistics) pair whose squared distance a branch needs
    pairs: List[Tuple[str, DomainStats]] = []

    def pair(x: str, stats: DomainStats) -> int:
        for j, (y, st) in enumerate(pairs):
            if y == x and st is stats:
                return j
        pairs.append((x, stats))
        return len(pairs) - 1

    uses: List[Tuple[str, List[int]]] = []  # per branch: kind, the pairs it reads (distance: 1, orientation: 2)
    for index, br in enumerate(branches):
        if br.source == "thumbnail":
            x = thumbnail(br.grid)
        elif br.source == "stage":
            x = stage(br.tensor, br.row_step)
        elif br.source in outputs:
            x = br.source
        else:
            raise ValueError(f"{model_path}: the graph has no {br.source!r} output to compute a domain score from")
        if br.kind == "distance":
            uses.append((br.kind, [pair(x, br.stats)]))
        elif br.kind == "orientation":
            if br.source != "thumbnail":
                raise ValueError("the orientation branch works on a thumbnail")
            perm = rotate180(np.arange(br.stats.means.shape[1], dtype=np.int64)[None], br.grid)[0]
            inits[f"{prefix}b{index}/rot_index"] = perm
            rot = node("Gather", [x, f"{prefix}b{index}/rot_index"], f"{prefix}b{index}/rot", axis=1)
            uses.append((br.kind, [pair(x, br.stats), pair(rot, br.stats)]))
        else:
            raise ValueError(f"unknown branch kind {br.kind!r}")

    k_max = max(st.means.shape[0] for _, st in pairs)
    dims = [st.means.shape[1] for _, st in pairs]
    ranks = [st.vectors.shape[1] for _, st in pairs]
    n_cols = len(pairs) * k_max
    iso = np.zeros((sum(dims), n_cols), np.float32)                     # |u|^2 / s2 into each class column of the pair
    quad = np.zeros((sum(ranks) + n_cols, n_cols), np.float32)          # sum p_i^2 w_i
    pick = np.zeros((sum(ranks) + n_cols, n_cols), np.float32)          # u . a_c + k_c
    centres = []
    row, col = 0, 0
    for j, (x, st) in enumerate(pairs):
        means = st.means.astype(np.float64)
        means = np.concatenate([means, np.repeat(means[:1], k_max - len(means), 0)])  # pad: the min is unchanged
        vec = st.vectors.astype(np.float64)
        inv_tail = 1.0 / st.tail_variance
        w = 1.0 / st.eigenvalues - inv_tail
        centre = means.mean(0)
        delta = means - centre                                        # [K, C]
        q = delta @ vec                                               # [K, r]
        lin = -2.0 * (delta * inv_tail + (q * w) @ vec.T)             # [K, C]
        const = (delta * delta).sum(1) * inv_tail + (q * q) @ w       # [K]
        key = f"{prefix}p{j}/"
        # an input in quantized units: its statistics are a (input - offset), so u = a (input - offset -
        # centre / a); the offset and 1 / a go into the centre, a into the weights
        a, offset = units.get(x, (1.0, 0.0))
        inits[key + "W"] = (a * np.concatenate([vec, lin.T], 1)).astype(np.float32)
        inits[key + "b"] = np.concatenate([np.zeros(ranks[j]), const]).astype(np.float32)
        centres.append(offset + centre / a)
        cols = slice(j * k_max, (j + 1) * k_max)
        iso[row:row + dims[j], cols] = a * a * inv_tail
        quad[col:col + ranks[j], cols] = w[:, None]
        pick[col + ranks[j]:col + ranks[j] + k_max, cols] = np.eye(k_max)
        row, col = row + dims[j], col + ranks[j] + k_max
    u_all = node("Sub", [node("Concat", [x for x, _ in pairs], prefix + "inputs", axis=1) if len(pairs) > 1
                         else pairs[0][0], prefix + "centres"], prefix + "u")
    inits[prefix + "centres"] = np.concatenate(centres).astype(np.float32)
    if len(pairs) > 1:
        inits[prefix + "split"] = np.array(dims, np.int64)
        parts = [f"{prefix}p{j}/u" for j in range(len(pairs))]
        nodes.append(helper.make_node("Split", [u_all, prefix + "split"] if opset >= 13 else [u_all], parts,
                                      name=prefix + "split", axis=1, **({} if opset >= 13 else {"split": dims})))
    else:
        parts = [u_all]
    # a pair that shares its statistics with an earlier one (the orientation branch's rotated thumbnail)
    # shares its Gemm too: both rows in one call, the weights read once
    twin: Dict[int, int] = {}
    for j, (x, st) in enumerate(pairs):
        first = next(i for i, (_, other) in enumerate(pairs) if other is st)
        if first != j and x not in units and pairs[first][0] not in units and first not in twin.values():
            twin[first] = j
    gemm_out = [""] * len(pairs)
    for j, u in enumerate(parts):
        if j in twin.values():
            continue
        if j in twin:
            k = twin[j]
            both = node("Gemm", [node("Concat", [u, parts[k]], f"{prefix}p{j}/u_twin", axis=0), f"{prefix}p{j}/W",
                                 f"{prefix}p{j}/b"], f"{prefix}p{j}/y_twin")
            halves = [f"{prefix}p{j}/y", f"{prefix}p{k}/y"]
            nodes.append(helper.make_node("Split", [both], halves, name=prefix + f"p{j}/split_twin", axis=0,
                                          **({"num_outputs": 2} if opset >= 18 else {})))
            gemm_out[j], gemm_out[k] = halves
            for name in ("W", "b"):
                del inits[f"{prefix}p{k}/{name}"]
        else:
            gemm_out[j] = node("Gemm", [u, f"{prefix}p{j}/W", f"{prefix}p{j}/b"], f"{prefix}p{j}/y")
    y = node("Concat", gemm_out, prefix + "y", axis=1) if len(gemm_out) > 1 else gemm_out[0]
    inits.update({prefix + "iso": iso, prefix + "quad": quad, prefix + "pick": pick})
    d2_all = node("Add", [node("Add", [
        node("MatMul", [node("Mul", [u_all, u_all], prefix + "u2"), prefix + "iso"], prefix + "d2_iso"),
        node("MatMul", [node("Mul", [y, y], prefix + "y2"), prefix + "quad"], prefix + "d2_quad")], prefix + "d2_sum"),
        node("MatMul", [y, prefix + "pick"], prefix + "d2_lin")], prefix + "d2_classes")      # [N, pairs * K]
    inits[prefix + "shape"] = np.array([-1, len(pairs), k_max], np.int64)
    d2 = reduce("ReduceMin", node("Reshape", [d2_all, prefix + "shape"], prefix + "d2_3d"), "axis2", prefix + "d2_min", 0)
    d2 = node("Relu", [d2], prefix + "d2")                                                    # [N, pairs]
    root = node("Sqrt", [d2], prefix + "distance")
    log = node("Log", [node("Add", [d2, prefix + "log_eps"], prefix + "d2_eps")], prefix + "log_d2")
    to_terms = np.zeros((len(pairs), len(branches)), np.float32)
    log_terms = np.zeros((len(pairs), len(branches)), np.float32)
    bias = np.zeros(len(branches), np.float32)
    for b, (br, (kind, js)) in enumerate(zip(branches, uses)):
        if kind == "distance":
            to_terms[js[0], b] = 1.0 / br.scale
        else:
            log_terms[js[0], b] += 1.0 / br.scale
            log_terms[js[1], b] -= 1.0 / br.scale
        bias[b] = -br.centre / br.scale
    inits.update({prefix + "to_terms": to_terms, prefix + "log_terms": log_terms, prefix + "bias": bias})
    terms = node("Add", [node("MatMul", [root, prefix + "to_terms"], prefix + "t_distance"),
                         node("MatMul", [log, prefix + "log_terms"], prefix + "t_log")], prefix + "t_sum")
    node("Add", [terms, prefix + "bias"], TERMS_OUTPUT)
    nodes[-1].name = prefix + TERMS_OUTPUT
    reduce("ReduceMax", TERMS_OUTPUT, "axis1", DOMAIN_OUTPUT, 0)
    nodes[-1].name = prefix + DOMAIN_OUTPUT
    graph.initializer.extend(numpy_helper.from_array(array, key) for key, array in inits.items())
    graph.node.extend(nodes)
    batch = None
    dims_out = graph.output[0].type.tensor_type.shape.dim
    if len(dims_out):
        batch = dims_out[0].dim_param or dims_out[0].dim_value or None
    graph.output.append(helper.make_tensor_value_info(DOMAIN_OUTPUT, TensorProto.FLOAT, [batch]))
    graph.output.append(helper.make_tensor_value_info(TERMS_OUTPUT, TensorProto.FLOAT, [batch, len(branches)]))
    out = Path(out_path or model_path)
    onnx.save(model, str(out))
    return out


def reference_scores(branches: List[Branch], inputs: List[np.ndarray]) -> np.ndarray:
    """The score the graph computes, from each branch's inputs (float64 numpy)."""
    return np.max(np.stack([(br.values(x) - br.centre) / br.scale for br, x in zip(branches, inputs)]), axis=0)


def standardise_branch(br: Branch, val_values: np.ndarray) -> None:
    """Set the branch's centre and scale from its validation values (median 0, 95th percentile 1)."""
    v = np.asarray(val_values, np.float64)
    br.centre = float(np.quantile(v, CENTRE_Q))
    spread = float(np.quantile(v, SCALE_Q)) - br.centre
    br.scale = spread if spread > 1e-6 * max(1.0, abs(br.centre)) else max(1e-6, 1e-3 * abs(br.centre))


def operating_points(val_scores: np.ndarray, rates: Sequence[float] = OPERATING_RATES) -> List[Dict[str, float]]:
    """The spec's ``domain.operating_points``: for each flag rate, the threshold that flags that share
    of the validation scores (:func:`calibrate`), so a user can choose a stricter or looser check than
    the file's own (``cxr-infer --domain-flag-rate``). Rates sorted, duplicates dropped."""
    return [{"flag_rate": float(r), "threshold": calibrate(val_scores, float(r))} for r in sorted(set(rates))]


def calibrate(val_scores: np.ndarray, flag_rate: float = DEFAULT_FLAG_RATE) -> float:
    """The threshold above which ``flag_rate`` of the validation scores lie."""
    if not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag rate {flag_rate} must be in (0, 1)")
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - flag_rate, method="higher"))


def branch_inputs(spec: ModelSpec, pixels: np.ndarray, feats: np.ndarray,
                  stages: Optional[List[np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Each branch source's numbers for ``pixels``: the features, the standardised thumbnails and
    the stage statistics (``stages``, from :func:`stage_features`) as ``stage1``, ``stage2``, ..."""
    out = {"features": feats}
    out.update({f"thumb{g}": thumbnails(spec, pixels, g) for g in THUMB_GRIDS})
    out.update({f"stage{i + 1}": s for i, s in enumerate(stages or [])})
    return out


def fit_branches(spec: ModelSpec, feat_name: str, train: Dict[str, np.ndarray], labels: np.ndarray,
                 val: Dict[str, np.ndarray], rank: int = DEFAULT_RANK, taps: Optional[List[str]] = None,
                 features_branch: bool = False,
                 stage_rank: int = DEFAULT_STAGE_RANK,
                 stage_row_step: int | Sequence[int] = 1) -> Tuple[List[Branch], List[str], np.ndarray]:
    """The branches fitted on ``train`` and standardised on ``val``, which input each reads, and
    their standardised validation terms ``[branches, N]``. ``taps``: the tensors of the stage
    branches (``train`` and ``val`` hold their statistics as ``stage1``, ``stage2``, ...).
    ``features_branch=True`` adds a branch on the pooled features (see :func:`add_domain_stats`).
    ``stage_rank``: the rank of the stage branches (``rank``: of the others); ``stage_row_step``: every
    how many rows they were read, one for all or one per tap (see :func:`stage_feature_nodes`)."""
    s16 = fit_stats(train[f"thumb{THUMB}"], labels, rank)
    s8 = fit_stats(train[f"thumb{THUMB_COARSE}"], labels, rank)
    s4 = fit_stats(train[f"thumb{THUMB_COARSEST}"], labels, rank)
    branches = [Branch(f"thumb{THUMB}", "distance", "thumbnail", s16, THUMB),
                Branch(f"thumb{THUMB_COARSE}", "distance", "thumbnail", s8, THUMB_COARSE),
                Branch(f"thumb{THUMB_COARSEST}", "distance", "thumbnail", s4, THUMB_COARSEST),
                Branch("orientation", "orientation", "thumbnail", s16, THUMB)]
    keys = [f"thumb{THUMB}", f"thumb{THUMB_COARSE}", f"thumb{THUMB_COARSEST}", f"thumb{THUMB}"]
    if features_branch:
        branches.insert(0, Branch("features", "distance", feat_name, fit_stats(train["features"], labels, rank)))
        keys.insert(0, "features")
    steps = _per_tap(stage_row_step, len(taps or []))
    for i, tensor in enumerate(taps or []):
        key = f"stage{i + 1}"
        branches.append(Branch(key, "distance", "stage", fit_stats(train[key], labels, stage_rank),
                               tensor=tensor, row_step=steps[i]))
        keys.append(key)
    terms = []
    for br, k in zip(branches, keys):
        v = br.values(val[k])
        standardise_branch(br, v)
        terms.append((v - br.centre) / br.scale)
    return branches, keys, np.stack(terms)


def add_domain_stats(model_path: str | Path, train_pixels: np.ndarray, train_labels: np.ndarray,
                     val_pixels: np.ndarray, out_path: Optional[str | Path] = None, rank: int = DEFAULT_RANK,
                     flag_rate: float = DEFAULT_FLAG_RATE, threads: int = 0, source: str = "",
                     taps: Optional[List[str]] = None, features_branch: Optional[bool] = None,
                     stage_rank: int = DEFAULT_STAGE_RANK,
                     stage_tall_rows: int = DEFAULT_STAGE_TALL_ROWS) -> Dict[str, Any]:
    """Fit on ``train_pixels`` through this file's own features, standardise and calibrate on ``val_pixels``.

    ``taps``: the graph tensors that get a stage branch each (default :func:`default_taps`, by the
    spec's backbone; ``[]`` for none).

    ``features_branch``: a branch on the pooled features too; default (None): only when there are
    no stage branches, so that the check always reads the model's own representation somewhere.
    Left out for the three backbones since 2026-11-29: it is the branch INT8 rounding moves most
    between engines (OpenVINO's integer kernels moved ResNet50's by up to 0.97 of its threshold,
    the stage statistics by at most 0.09), and without it re-fitted files flag as much or more (a
    choice made after measuring on ``foreign_cxr``, see the module docstring).

    ``stage_rank``: the eigenvectors kept exactly for a stage branch (``rank``: for the others;
    :data:`DEFAULT_STAGE_RANK`).

    ``stage_tall_rows``: a stage tensor taller than this is read on every second row, every column
    (:data:`DEFAULT_STAGE_TALL_ROWS`; 0: every row): a Slice of whole rows, which onnxruntime runs
    fast; the spec records each tensor's step (``stage_row_steps``). (An earlier ``stage_grid`` read
    every s-th row *and column* with a strided MaxPool, which onnxruntime ran slower than the whole
    tensor: measured with 28 on re-fitted copies when stage tensors were still dequantized, it cut the
    cost from 9.5 / 25.4 / 12.0% to 4.9 / 18.6 / 11.2% but VGG16 missed one of 12 laterals and flagged
    84% of adults instead of 88%; with the integer read it saved nothing. It was removed.)

    Writes ``out_path`` (default: in place) and returns the spec's new
    ``domain`` block. The probabilities output is checked to be bit-identical before and after (an FP16
    file on a CPU: within :data:`FP16_TOLERANCE`); the file is replaced only once every check passed.
    """
    model_path = Path(model_path)
    out = Path(out_path or model_path)
    spec = read_spec(model_path)
    feat_name = spec.features_output
    if not feat_name:
        raise ValueError(f"{model_path}: its spec names no features output (exported with --no-features?)")
    t0 = time.perf_counter()
    probs_before, feats = run_outputs(model_path, spec, train_pixels, [spec.prob_output, feat_name], threads=threads)
    (val_feats,) = run_outputs(model_path, spec, val_pixels, [feat_name], threads=threads)
    taps = default_taps(spec, model_path) if taps is None else list(taps)
    if features_branch is None:  # the model's own representation is read by the stage branches, or by this one
        features_branch = not taps
    if stage_tall_rows < 0:
        raise ValueError(f"stage_tall_rows must be 0 (every row) or a positive row count, not {stage_tall_rows}")
    stage_row_step = stage_row_steps(model_path, taps, stage_tall_rows)
    train_in = branch_inputs(spec, train_pixels, feats,
                             stage_features(model_path, spec, train_pixels, taps, threads=threads,
                                            row_step=stage_row_step))
    val_in = branch_inputs(spec, val_pixels, val_feats,
                           stage_features(model_path, spec, val_pixels, taps, threads=threads,
                                          row_step=stage_row_step))
    branches, keys, val_terms = fit_branches(spec, feat_name, train_in, train_labels, val_in, rank, taps,
                                             features_branch, stage_rank, stage_row_step)
    kernels = {grid: pool_kernel(spec, grid) for grid in THUMB_GRIDS}
    # written beside the target and moved over it only once every check has passed: a failed check
    # leaves the file as it was
    staged = out.with_name(out.name + ".tmp")
    try:
        add_domain_graph(model_path, branches, staged, kernels)
        (val_scores,) = run_outputs(staged, spec, val_pixels, [DOMAIN_OUTPUT], threads=threads)
        bad = int(np.sum(~np.isfinite(val_scores)))
        if bad:
            raise ValueError(f"{model_path}: its domain score is not a number (inf or NaN) for {bad} of "
                             f"{len(val_scores)} validation images: values inside the graph leave the file's "
                             "number range (float16: +-65504); leave this precision out, or --no-domain-stats")
        k = min(16, len(train_pixels))
        probs_after, train_scores = run_outputs(staged, spec, train_pixels[:k], [spec.prob_output, DOMAIN_OUTPUT],
                                                threads=threads)
        ref = reference_scores(branches, [train_in[key][:k] for key in keys])
        graph_vs_numpy = float(np.max(np.abs(train_scores - ref) / np.maximum(np.abs(ref), 1.0))) if len(ref) else 0.0
        change = float(np.max(np.abs(probs_after - probs_before[:k]))) if k else 0.0
        # FP32 and INT8: bit for bit. FP16 on a CPU: onnxruntime runs the FP16 ops in FP32 between casts it
        # removes where it can; a stage tensor with one more reader is rounded to FP16, as the file says it is
        # (measured: 1.0e-3 on a ResNet50). Bounded by what FP16 already differs from FP32.
        if (change != 0.0 and spec.precision != "fp16") or change > FP16_TOLERANCE:
            raise RuntimeError(f"{out}: adding the domain graph changed the probabilities by {change:.3g} (a bug)")
        if graph_vs_numpy > 0.05:
            raise RuntimeError(f"{out}: the graph's domain score differs from the numpy reference by "
                               f"{graph_vs_numpy:.3g} (a bug)")
        threshold = calibrate(val_scores, flag_rate)
        deciding = {br.name: float(np.mean((np.argmax(val_terms, 0) == j) & (val_scores > threshold)))
                    for j, br in enumerate(branches)}
        block = {
            "method": METHOD,
            "score": "max over branches of (value - centre) / scale; a branch's value is sqrt(min over classes of "
                     "the squared Mahalanobis distance), or for orientation log(d2 upright) - log(d2 rotated 180 "
                     "degrees)",
            "stage_tensors": taps,
            "stage_tall_rows": int(stage_tall_rows),
            "stage_row_steps": [int(k) for k in stage_row_step],
            "threshold": threshold,
            "target_flag_rate": flag_rate,
            "flag_rate_validation": float(np.mean(val_scores > threshold)),
            "operating_points": operating_points(val_scores, tuple(OPERATING_RATES) + (flag_rate,)),
            "flagged_validation_by_branch": deciding,
            "features_output": feat_name,
            "branches": [br.describe(spec.input_name) for br in branches],
            "rank": int(branches[0].stats.vectors.shape[1]),
            "shrinkage": branches[0].stats.shrinkage,
            "fit": {"images": int(len(train_pixels)), "part": "train part of the split, class-balanced",
                    "source": source},
            "calibration": {"images": int(len(val_pixels)), "part": "val part of the split",
                            "val_score_median": float(np.median(val_scores))},
            "graph_vs_numpy_max_diff": graph_vs_numpy,
            "probabilities_unchanged": True if change == 0.0 else f"within {change:.2g} (FP16 on CPU)",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_spec(staged, spec.updated({"domain": block},
                                        outputs={"domain_score": DOMAIN_OUTPUT, "domain_terms": TERMS_OUTPUT}))
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return block


def load_sets(ckpt_dir: str | Path, data_dir: str | Path, size: Tuple[int, int], fit_count: int = DEFAULT_FIT_COUNT,
              val_count: Optional[int] = None):
    """(train pixels, train labels, val pixels) from the run's split (never the test split)."""
    from .images import image_set

    tr_px, tr_y, _ = image_set(ckpt_dir, data_dir, "train", fit_count, size)
    va_px, _, _ = image_set(ckpt_dir, data_dir, "val", val_count, size)
    return tr_px, tr_y, va_px


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_export.domain",
                                description="Add (or refresh) out-of-domain statistics in existing cxr model files.",
                                epilog="example: python -m cxr_export.domain runs/gpu2/vgg16 runs/export/vgg16_int8.onnx"
                                       " --data .data/train")
    p.add_argument("checkpoint", help="the cxr-train run folder of the model (its split.json says train / val)")
    p.add_argument("models", nargs="+", help="model file(s) of that run, updated in place unless --out")
    p.add_argument("--data", required=True, help="the training folder the checkpoint was trained on")
    p.add_argument("--out", help="write here instead of in place (one model only)")
    p.add_argument("--fit-count", type=int, default=DEFAULT_FIT_COUNT, help="train images, class-balanced (default 1500)")
    p.add_argument("--val-count", type=int, default=0, help="val images for the threshold (default 0 = all)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="eigenvectors kept exactly (default 256)")
    p.add_argument("--stage-rank", type=int, default=DEFAULT_STAGE_RANK,
                   help=f"the same for the stage branches (default {DEFAULT_STAGE_RANK})")
    p.add_argument("--flag-rate", type=float, default=DEFAULT_FLAG_RATE,
                   help="share of in-domain (val) images flagged (default 0.05)")
    p.add_argument("--taps", default=None, metavar="T1,T2|none",
                   help="graph tensors that get a stage branch (channel means and standard deviations), comma-"
                        "separated; 'none' for no stage branches (default: by the spec's backbone, see STAGE_TAPS)")
    p.add_argument("--features-branch", action=argparse.BooleanOptionalAction, default=None,
                   help="a branch on the pooled features too (default: only when the file gets no stage "
                        "branches; since 2026-11-29 VGG16, ResNet50 and InceptionV3 files get none: it is the "
                        "branch INT8 rounding moves most between engines; see add_domain_stats)")
    p.add_argument("--stage-tall-rows", type=int, default=DEFAULT_STAGE_TALL_ROWS, metavar="R",
                   help="read a stage tensor taller than R rows on every second row, every column: cheaper, "
                        f"and flags as much (default {DEFAULT_STAGE_TALL_ROWS}; 0 = every row of every tensor)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.stage_tall_rows < 0:
        p.error("--stage-tall-rows must be 0 (every row) or a positive row count")
    taps = None if args.taps is None else [t for t in args.taps.split(",") if t and args.taps != "none"]
    if args.out and len(args.models) > 1:
        p.error("--out takes one model")
    sets: Dict[Tuple[int, int], Any] = {}
    for path in args.models:
        spec = read_spec(path)
        size = spec.image_size
        if size not in sets:
            sets[size] = load_sets(args.checkpoint, args.data, size, args.fit_count, args.val_count or None)
        tr_px, tr_y, va_px = sets[size]
        block = add_domain_stats(path, tr_px, tr_y, va_px, args.out, args.rank, args.flag_rate, args.threads,
                                 source=str(args.data), taps=taps, features_branch=args.features_branch,
                                 stage_rank=args.stage_rank,
                                 stage_tall_rows=args.stage_tall_rows)
        print(f"{args.out or path}: domain threshold {block['threshold']:.4g} (val flag rate "
              f"{block['flag_rate_validation']:.3f}), {block['fit']['images']} train images, rank {block['rank']}, "
              f"shrinkage {block['shrinkage']:.3f}, {len(block['branches'])} branches, {block['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
