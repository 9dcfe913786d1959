"""How close to the silicon: a model's FLOPs per forward pass, and this CPU's peak FLOP/s per precision.

    python benchmarks/roofline.py [--threads N]     # prints the peak table for this CPU

Peak = cores × clock × FLOPs per core per cycle. Cores: the threads the benchmark runs on, at most the CPU's cores.
Clock: the highest the kernel reports (cpufreq's cpuinfo_max_freq, else /proc/cpuinfo's "cpu MHz", which is the
current clock and under a VM often the nominal one). FLOPs per core per cycle, from /proc/cpuinfo's flags:
- fp32: vector lanes (16 with avx512f, 8 with avx2/fma, 4 with sse) × 2 (an FMA is a multiply and an add) × 2 FMA
  units (most x86 cores since Haswell / Zen 2 have two; some Xeon Silver / Bronze have one AVX-512 unit);
- bf16: 1024 with AMX (amx_bf16), 2× fp32 with avx512_bf16, else fp32's (OpenVINO then runs bf16 requests as fp32);
- int8 (integer ops, counted like FLOPs): 2048 with AMX (amx_int8), 4× fp32 with VNNI (avx512_vnni / avx_vnni: one
  vpdpbusd does four multiply-adds per 32-bit lane), else 2× fp32 (pmaddubsw and its widening adds).
These are upper bounds a real convolution never reaches (memory, im2col, non-GEMM layers); the ratio says how much
room is left, not a target.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CPU:
    """What /proc/cpuinfo says: the model name, its flags, cores and the clock in GHz (and where the clock is from)."""

    name: str
    flags: frozenset[str]
    cores: int
    ghz: float
    clock_source: str

    @classmethod
    def read(cls) -> CPU:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cores = int(fields.get("cpu cores", 0)) * max(1, len({line for line in text.splitlines()
                                                              if line.startswith("physical id")}))
        cores = cores or os.cpu_count() or 1
        max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        try:
            ghz, source = int(max_freq.read_text()) / 1e6, "cpuinfo_max_freq"
        except (OSError, ValueError):
            ghz, source = float(fields.get("cpu MHz", 0) or 0) / 1e3, "cpu MHz (current clock)"
        return cls(fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split()), cores, ghz,
                   source)

    def fp32_per_cycle(self) -> int:
        lanes = 16 if "avx512f" in self.flags else 8 if {"avx2", "fma"} <= self.flags else 4
        return lanes * 2 * 2

    def per_cycle(self, precision: str) -> tuple[int, str]:
        """FLOPs (or int8 ops) per core per cycle at `precision`, and the instructions that give them."""
        fp32 = self.fp32_per_cycle()
        unit = "avx512f" if "avx512f" in self.flags else "avx2+fma" if {"avx2", "fma"} <= self.flags else "sse"
        if precision == "bf16":
            if "amx_bf16" in self.flags:
                return 1024, "amx_bf16"
            if "avx512_bf16" in self.flags:
                return 2 * fp32, "avx512_bf16"
            return fp32, f"{unit} (no native bf16: runs as fp32)"
        if precision == "int8":
            if "amx_int8" in self.flags:
                return 2048, "amx_int8"
            if self.flags & {"avx512_vnni", "avx_vnni"}:
                return 4 * fp32, "vnni"
            return 2 * fp32, f"{unit} pmaddubsw (no VNNI)"
        return fp32, unit

    def peak_gflops(self, precision: str, threads: int) -> float:
        """The peak of `threads` threads (at most the cores) at `precision`, in GFLOP/s."""
        return min(threads, self.cores) * self.ghz * self.per_cycle(precision)[0]


def forward_gflop(model, batch, txt_feats) -> float:
    """GFLOP of one forward pass of a (fused) ultralytics WorldModel on `batch` with `txt_feats`, counted by torch's
    FlopCounterMode (convolutions, matmuls, einsums: 2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.model[-1].nc = int(txt_feats.shape[1])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.predict(batch.float(), txt_feats=txt_feats.float())
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    cpu = CPU.read()
    print(f"{cpu.name}: {cpu.cores} cores, {cpu.ghz:.2f} GHz ({cpu.clock_source}), {args.threads} threads")
    for precision in ("fp32", "bf16", "int8"):
        per, how = cpu.per_cycle(precision)
        print(f"  {precision}: {per} per core per cycle ({how}) -> {cpu.peak_gflops(precision, args.threads):.0f} "
              "GFLOP/s")


if __name__ == "__main__":
    main()
