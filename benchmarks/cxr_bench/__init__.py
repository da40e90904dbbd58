"""cxr_bench: accuracy and latency reports for any cxr model file, against PyTorch eager.

Every report is written twice, as JSON (every figure, machine-readable) and as Markdown
(for people), so each number in a README can be traced back to a file and a command.

Examples:
    $ cxr-bench accuracy --model runs/export/resnet50_int8.onnx --data data/test --out /tmp/bench
    $ cxr-bench latency --model runs/export/resnet50_int8.onnx --batch 1,8 --threads 2
"""
__version__ = "0.1.0"
