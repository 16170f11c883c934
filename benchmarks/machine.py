"""Print the machine a figure is measured on, for benchmarks/README.md and README.md:

    .venv/bin/python benchmarks/machine.py
    AMD EPYC (family 25, model 17), AVX512, native bf16: yes, 2 cores

Model, the ISA PyTorch dispatches to, native bf16 or not (what ``run.precision=auto`` decides by), and,
on a GPU machine, the cards first. Honours ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, so an emulated
AVX2 run names itself as one.
"""

from infomax.runtime.hardware import choose_precision, describe_machine

if __name__ == "__main__":
    print(f"{describe_machine()}; run.precision=auto -> {choose_precision('auto').line()}")
