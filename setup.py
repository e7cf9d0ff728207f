"""moe_grok: find grokking inside Mixture-of-Experts LMs by watching routing pathways."""
import setuptools

setuptools.setup(
    name="moe_grok",
    version="0.1.0",
    description="Routing-pathway grokking analysis for MoE language models (JAX/Flax).",
    packages=setuptools.find_packages(include=["moe_grok", "moe_grok.*"]),
    # moe_grok/configs/*.py (the shipped run configs) are modules of the package: installed with it.
    entry_points={"console_scripts": ["moe-grok = moe_grok.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "chex",
        "absl-py",
        "ml_collections",
        "ml_dtypes",
        "matplotlib",
        "rapidfuzz",
        "scipy",
        "tqdm",
        "tokenizers",
    ],
    extras_require={
        # transformers: HF's models are the parity tests' numerical reference; tested with 5.23 and 5.25.
        # tensorboard: the tests read the event files back with its reader; accelerate: transformers' Trainer needs it.
        "test": ["pytest", "pytest-xdist", "ruff", "transformers>=5.23,<5.26", "torch==2.13.0", "tensorboard",
                 "accelerate"],
        "hub": ["huggingface_hub"],
        # moe_grok.integrations: the routing of transformers MoE models in a torch loop or a Trainer
        # (the Trainer itself needs accelerate).
        "hf": ["transformers>=5.23", "torch", "accelerate"],
    },
)
