"""Benchmarks of STM-DLP: accuracy against exact phantom truth and speed against the machine's limits.

    python -m experiments.bench --profile cpu          # the documented run; writes BENCHMARKS.md, docs/bench/*.png
    python -m experiments.bench --profile gpu          # full scale on an accelerator (BENCHMARKS_gpu.md)
    python -m experiments.bench --profile smoke --out /tmp/bench   # seconds-to-minutes, toy size (CI)

Sections (each can be skipped with ``--skip``): ``accuracy`` (trains every model with
``python -m stm_dlp.run`` in a subprocess and reads its ``metrics.json``; the calculation approach via
``model=calc``; MAE / RMSE / R², the clinical readout's Dice, volume errors and voxelwise r per condition;
the default model trained on each phantom family and tested on the other, ``Profile.cross_family``),
``speed`` (training throughput, memory, inference, roofline), ``data`` (loader and
DICOM parse rates), ``deconv`` (``experiments/bench_deconv.py``), ``profile`` (torch.profiler top ops).
Everything measured goes to ``OUT/results.json``; the Markdown report is generated from it
(``--report-only`` regenerates the report from an existing ``results.json``).
"""
