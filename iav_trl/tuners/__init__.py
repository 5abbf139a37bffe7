"""Adapters that attach to a base model, one folder per method, as PEFT lays out its tuners."""
