"""Training data grouped by domain -> `splits.EvalSplit` for next-token-prediction analysis.

Every loader returns an EvalSplit of N samples padded to S = seq_len tokens:

  tokens      [N, S] int32  token ids, right-padded with `pad_id` (default 1, OLMoE's pad id)
  mask        [N, S] int32  1 = real token, 0 = padding
  targets     [N, S] int32  tokens[:, t + 1] at position t (0 in the last column), from
                            `splits.next_token_targets`
  target_mask [N, S] int32  1 where both position t and t + 1 are real tokens
  groups      [N]    int32  index into group_names (one group = one data domain)

Sources (one module of this package per file format):
  jsonl.load_jsonl_text         JSONL of raw text, tokenized with a `tokenizers` tokenizer.json
  jsonl.load_jsonl_ids          JSONL of pre-tokenized id lists
  npy.load_npy_ids              one 2-D int .npy per group (+ optional lengths .npy or in-file pad id)
  olmo_memmap.load_olmo_memmap  OLMo-style flat token files (np.memmap, uint16/uint32), instances as
                                fixed chunks of the stream or from an explicit instance index
  assemble.make_lm_split        in-memory id lists per group (assemble: what the loaders share)
  from_config.load_split        any of the above from a config (moe_grok/configs/olmoe_grokking.py's `data`)
domains: a file's group (domain) name and which samples of a group are kept. Every public name is
importable from this package.

Common rules (all loaders):
  * Groups keep their order of first appearance (files in the order given, records in file
    order); samples keep file order. Same inputs + same seed -> identical split.
  * A sample longer than seq_len is truncated to its first seq_len tokens; the number of
    truncated samples is logged as one warning and reported in `LoadInfo.n_truncated`.
  * `max_samples_per_group=k` keeps k samples of each larger group, chosen without
    replacement by a generator seeded with (seed, crc32(group name)), so one group's choice
    does not depend on the other groups; chosen samples stay in file order. Sampling happens
    BEFORE tokenization / reading / dropping, so expensive work is done only for the chosen.
  * A sample with < 2 real tokens (after truncation) has no next-token target: with
    on_short="drop" (default) it is dropped and the count is logged and reported in
    `LoadInfo.n_dropped_short`; with on_short="error" it is a ValueError naming the sample.
  * Token ids must be integers in [0, vocab_size) when vocab_size is given (else in
    [0, 2**31)); a violation is a ValueError naming the sample (file:line / row / instance).
    Only the kept (post-truncation) tokens are checked.
  * An empty file, or a group left without samples, is a ValueError naming it.
Pass `return_info=True` to get `(split, LoadInfo)` with each row's provenance.
"""
from moe_grok.data.corpus.assemble import OLMOE_EOS_TOKEN, OLMOE_PAD_ID, LoadInfo, make_lm_split
from moe_grok.data.corpus.domains import file_group_name
from moe_grok.data.corpus.from_config import DATA_CONFIG_KEYS, FORMATS, load_split
from moe_grok.data.corpus.jsonl import load_jsonl_ids, load_jsonl_text
from moe_grok.data.corpus.npy import load_npy_ids
from moe_grok.data.corpus.olmo_memmap import load_olmo_memmap, open_token_file

__all__ = [
    "DATA_CONFIG_KEYS", "FORMATS", "LoadInfo", "OLMOE_EOS_TOKEN", "OLMOE_PAD_ID", "file_group_name", "load_jsonl_ids",
    "load_jsonl_text", "load_npy_ids", "load_olmo_memmap", "load_split", "make_lm_split",
    "open_token_file",
]
