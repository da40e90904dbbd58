"""cxr_bench: accuracy, latency and other reports of cxr model files, each written as JSON (every
figure) and Markdown (for people); see docs/benchmarks.md.

Examples:
    $ cxr-bench accuracy --model runs/export/resnet50_int8.onnx --data data/test --out /tmp/bench
"""
__version__ = "0.1.0"
