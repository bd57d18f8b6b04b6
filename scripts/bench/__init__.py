"""scripts/benchmark.py's subcommands, one module each (train, remat, moe, decode, state,
checkpoint, memory, input_pipeline), the command line that joins them (cli), and what they share:
flags, presets (a preset's config, trainer and batch), timing, peak (the matmul peak MFU
divides by) and rows (printing). hf_compare alone imports torch and transformers.

TensorFlow, JAX and torch are imported inside the functions that use them: spawn re-imports
these modules in each input-pipeline child, which must pin its cores before TensorFlow loads.
"""
