# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Data preparation
# Turn a corpus into token files the later stages train on: load the text, choose a tokenizer,
# cut train / validation / test splits, and look at what the model will see.
# The test split is held out for `05_final_model`; no stage uses it to choose anything.

# %% tags=["parameters"]
corpus = "tinyshakespeare"  # bundled name, URL, .txt, .jsonl(.gz), .parquet, or a folder or glob of such files
corpus_sha256 = None  # expected sha256 of a file or URL corpus (None: not checked)
text_field = "text"  # the field (.jsonl) or column (.parquet) that holds each document
tokenizer = (
    None  # char | byte | gpt2 | tiktoken:<encoding name> | hf:<checkpoint folder> (None: char, or init_from's own)
)
init_from = (
    None  # a checkpoint the later stages fine-tune (a transformers GPT-2/Llama folder or a saved labutils model):
)
#   the corpus is prepared with its own tokenizer
splits = [0.9, 0.05, 0.05]  # train, val, test fractions
split_by = "auto"  # contiguous (in order; auto for one .txt file) | hash (whole documents; auto for collections)
prepared_dir = None  # where token files go (None: data/prepared/<corpus>-<tokenizer>)
out_dir = "results/01_data_prep"  # this stage's report, figures and hand-off file
profile = "auto"  # accepted for a uniform pipeline; data preparation is the same in every profile
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import data, findings, plotting, profiles, stage_folders

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(
    corpus=corpus,
    corpus_sha256=corpus_sha256,
    text_field=text_field,
    tokenizer=tokenizer,
    init_from=init_from,
    splits=splits,
    split_by=split_by,
    prepared_dir=prepared_dir,
    profile=profile,
)
init_from = stage_folders.keep_input(init_from, out_dir)  # a model in this stage's own folder: copied out first
profiles.resolve(profile)  # a misspelt profile fails here, like in the other stages
tokenizer = profiles.stage_tokenizer(tokenizer, init_from)
prepared = data.prepare_data(
    corpus, tokenizer, splits, prepared_dir, sha256=corpus_sha256, text_field=text_field, split_by=split_by
)  # bad inputs fail before anything is archived
stage = stage_folders.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)

# %% [markdown]
# ## Splits
# Characters, documents (the paragraphs of one .txt file; each file of a folder of .txt files; each JSON line
# or Parquet row) and tokens per split.

# %%
stats = data.split_stats(prepared)
stats.to_csv(stage / "split_stats.csv")
stats

# %% [markdown]
# ## Token frequencies
# The most frequent tokens and their share of the training split (the table lists every token).
# The long tail is what the model must learn from few examples.

# %%
freqs = data.token_frequencies(prepared)
freqs.to_csv(stage / "token_frequencies.csv", index=False)
fig = plotting.plot_token_frequencies(freqs)
plotting.save_figure(fig, stage / "figures" / "token_frequencies.png", key=True)

# %% [markdown]
# ## Document lengths
# Document-mode batching (write-up 001) pads documents shorter than the sequence length; this shows
# how much padding a given `block_size` would imply.

# %%
lengths = data.document_lengths(prepared)
fig = plotting.plot_document_lengths(lengths)
plotting.save_figure(fig, stage / "figures" / "document_lengths.png")

# %% [markdown]
# ## Hand-off
# `data.json` tells the next stages where the prepared files are; they fall back to preparing the
# bundled corpus themselves when it is absent.

# %%
handoff = stage_folders.write_handoff(
    stage / "data.json",
    headline=["tokenizer", "vocab_size", "train_tokens", "val_tokens"],
    findings={
        "prepared_dir": prepared.dir,
        **prepared.summary(),
        **data.document_length_stats(lengths, block_size=256),
    },
)
findings.show(findings.data_prep(handoff))
