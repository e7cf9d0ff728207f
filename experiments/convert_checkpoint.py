"""Convert an HF checkpoint of a supported model family (OLMoE, Qwen3-MoE; local directory or hub
revision) into a moe_grok checkpoint.

  python experiments/convert_checkpoint.py --hf_path=allenai/OLMoE-1B-7B-0924 \\
      --revision=step245000-tokens1027B --out=ckpts/olmoe-step245000 --dtype=bfloat16

--out must be new, empty or an earlier convert of the same source (re-run: replaced), unless
--overwrite; it is written aside and swapped in whole, and a second convert into the same --out
is refused while the first runs. The output directory is a checkpoint spec for experiments/olmoe_grokking.py (name it
step<N>... or append =<step>).
"""
from absl import app, flags

from moe_grok.studies import launch

_HF_PATH = flags.DEFINE_string("hf_path", None, "Local HF checkpoint directory, hub repo id or repo@revision.",
                               required=True)
_REVISION = flags.DEFINE_string("revision", None, "Hub revision, e.g. step245000-tokens1027B.")
_OUT = flags.DEFINE_string("out", None, "Output directory of the moe_grok checkpoint.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Parameter dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out whole (its files are deleted); without "
                               "it only a new, empty or earlier convert of the same source is written.")


def main(argv):
    del argv
    launch.quiet_logs()
    from moe_grok.model.checkpoint_io import convert_hf_checkpoint

    model_config, count = convert_hf_checkpoint(_HF_PATH.value, _OUT.value, dtype=_DTYPE.value,
                                                revision=_REVISION.value, overwrite=_OVERWRITE.value)
    print(f"wrote {_OUT.value}: {model_config.family} model, {count / 1e6:.1f}M parameters in {_DTYPE.value}")


if __name__ == "__main__":
    app.run(main)
