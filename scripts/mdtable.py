"""Replaces the text between two HTML-comment markers of a markdown file (creating both when absent): how the
measurement scripts put their generated tables into BENCHMARKS.md, CONFORMANCE.md and QUANTIZATION.md."""
import os


def replace_between(path, begin, end, body):
    text = open(path).read() if os.path.exists(path) else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = f"{text.rstrip()}\n\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pre}{begin}\n{body}\n{end}{post}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
