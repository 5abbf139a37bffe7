"""The real-data benchmark on SmolLM2-135M-Instruct with HH-RLHF and UltraFeedback: the splits and the report
(`benchmark.py`, `python -m benchmarks.real_data.benchmark`), and how each method is trained and scored
(`methods.py`)."""
