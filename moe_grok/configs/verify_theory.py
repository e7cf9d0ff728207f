"""The paper's synthetic check of the routing-kernel theory, and the bound along a toy run."""
import ml_collections

from moe_grok.theory.synthetic_run import synthetic_config


def get_config():
    config = ml_collections.ConfigDict()
    config.out = "runs/theory"  # results.csv, results.json, theory.png (a grid of cells: cells.csv, theory_grid.png)
    config.synthetic = synthetic_config()  # one run (SyntheticConfig: data, model, training, bound constants)
    config.sweep = ml_collections.ConfigDict(dict(
        n_clusters=(2, 4, 8),  # cluster counts (structures, crossed with spreads)
        spreads=(0.3, 1.0),  # within-cluster std relative to the centers
        router_seeds=20,  # router seeds 0..N-1 per structure (the only thing that varies within one)
        router_scales=(1.0,),  # router inverse temperatures (larger: input-specific routing), e.g. (1.0, 4.0, 16.0)
        top_ks=(0,),  # forward-pass gates: 0 = soft routing over all experts, k = the top-k experts, e.g. (0, 2)
        kernels=("analytic",),  # per training, the Gram's kernel(s): "analytic" (infinite-width NTK), "empirical"
    ))
    config.toy = ml_collections.ConfigDict(dict(
        workdir="",  # a finished toy run: follow the bound along its checkpoints instead ("" = synthetic)
        samples=1000,  # training samples (seeded subset, >= 1) in the toy-run Gram
    ))
    return config
