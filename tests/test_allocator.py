"""`cvvae.allocator.keep_freed_memory`: freed large tensors are reused without new page faults (glibc only)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cvvae import allocator

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Minor page faults of steps 3-6 of a small training loop whose activations (75 MB each) are far above
# glibc's 32 MiB mmap threshold: by default each step maps and faults them in again.
PROBE = """
import json, resource, sys
import torch
from cvvae.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.rand(1, 8, 9, 256, 256)
conv1, conv2 = torch.nn.Conv3d(8, 32, 3, padding=1), torch.nn.Conv3d(32, 8, 3, padding=1)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv2(torch.nn.functional.silu(conv1(x))).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[2:])}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=allocator.untuned_environ(), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc's malloc only")
def test_freed_block_is_reused_without_page_faults():
    default, keep = _probe("default"), _probe("keep")
    assert keep["applied"] and not default["applied"]
    if not (THP.is_file() and "[always]" in THP.read_text()):  # with THP always, faults come in 2 MiB pages
        pages = 4 * 75 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # at least one activation per step, 4 steps
        assert default["faults"] > pages  # glibc unmapped the activations: their pages fault again every step
    assert keep["faults"] < default["faults"] / 5  # the heap kept them


@pytest.mark.parametrize("var,value", [("CVVAE_ALLOCATOR", "system"), ("MALLOC_MMAP_THRESHOLD_", "1000000")])
def test_user_choices_are_left_alone(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert allocator.keep_freed_memory() is False


def test_train_tunes_the_allocator_and_inference_does_not(monkeypatch, tmp_path, capsys):
    from cvvae import cli
    from cvvae.bundled import bundled_path

    calls = []
    monkeypatch.setattr("cvvae.allocator.keep_freed_memory", lambda: calls.append("tuned") or True)
    monkeypatch.setattr("cvvae.train.trainer.train", lambda cfg, resume, quiet: tmp_path / "final")
    assert cli.main(["train", "configs/tiny.yaml", "-q"]) == 0 and calls == ["tuned"]
    assert cli.main(["info", str(bundled_path("cvvae"))]) == 0 and calls == ["tuned"]
