"""Batches from `pipeline.get_batches` and `get_shard_batches`: one fixed layout, packing
metadata that agrees with the tokens, every document read exactly once across input shards,
the same global batches however the shards are split between hosts, positions that resume
exactly, and reproducible shuffling."""
import json

import numpy as np
import pytest

from t5x_lite.data import corpora
from t5x_lite.data import objectives
from t5x_lite.data import pipeline
from t5x_lite.data import tasks
from t5x_lite.data import vocab

TASK = "data_pipeline_test_docs"
LENGTHS = {"inputs": 64, "targets": 16}
NUM_DOCUMENTS = 45
BYTES = vocab.byte_vocabulary()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Short documents registered as TASK, each cut on its own (one span-corruption chunk
    each), so that examples can be traced back to documents."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghij klmnop"))
    texts = ["".join(rng.choice(letters, size=rng.integers(4, 30))).strip() + "."
             for _ in range(NUM_DOCUMENTS)]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    tasks.register_text_task(TASK, [str(path)], vocabulary=BYTES,
                             objective=objectives.SpanCorruption(concatenate_documents=False))
    return texts


def batches(**kwargs):
    options = dict(shuffle=False, seed=0, repeat=False, pack=True)
    options.update(kwargs)
    batch_size = options.pop("batch_size", 8)
    task = options.pop("task", TASK)
    split = options.pop("split", "train")
    if "num_shards" in options:
        return list(pipeline.get_shard_batches(task, split, LENGTHS, batch_size, **options))
    return list(pipeline.get_batches(task, split, LENGTHS, batch_size, **options))


def segments(batch_list):
    """(encoder tokens, decoder target tokens) of every packed segment, EOS included."""
    found = []
    for batch in batch_list:
        for row in range(len(batch["encoder_input_tokens"])):
            for segment in range(1, batch["encoder_segment_ids"][row].max() + 1):
                found.append(tuple(
                    batch[tokens][row][batch[ids][row] == segment]
                    for tokens, ids in (("encoder_input_tokens", "encoder_segment_ids"),
                                        ("decoder_target_tokens", "decoder_segment_ids"))))
    return found


def decoded_documents(batch_list, rebuild):
    documents = []
    for inputs, targets in segments(batch_list):
        assert inputs[-1] == targets[-1] == BYTES.eos_id
        documents.append(BYTES.decode(rebuild(inputs[:-1], targets[:-1], BYTES.vocab_size)))
    return documents


@pytest.mark.parametrize("pack", [True, False])
def test_batches_have_the_fixed_keys_shapes_and_dtype(docs, pack):
    batch = batches(pack=pack)[0]
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for key, value in batch.items():
        length = LENGTHS["inputs"] if key.startswith("encoder") else LENGTHS["targets"]
        assert value.shape == (8, length) and value.dtype == np.int32, key


def check_segment_layout(tokens, segment_ids, positions):
    """Segments are nondecreasing runs of ids >= 1 followed by padding; positions count from
    0 within each run."""
    assert np.array_equal(segment_ids != 0, tokens != 0)
    real = segment_ids[segment_ids != 0]
    assert np.all(np.diff(real) >= 0) and np.all(segment_ids[len(real):] == 0)
    starts = np.r_[True, real[1:] != real[:-1]]
    expected_positions = np.zeros_like(positions)
    for i in range(len(real)):
        expected_positions[i] = 0 if starts[i] else expected_positions[i - 1] + 1
    np.testing.assert_array_equal(positions, expected_positions)
    return starts


@pytest.mark.parametrize("pack", [True, False])
def test_segment_ids_positions_and_shifted_decoder_inputs_agree(docs, pack):
    batch_list = batches(pack=pack)
    max_segments = 0
    for batch in batch_list:
        for row in range(8):
            check_segment_layout(batch["encoder_input_tokens"][row],
                                 batch["encoder_segment_ids"][row],
                                 batch["encoder_positions"][row])
            targets = batch["decoder_target_tokens"][row]
            starts = check_segment_layout(targets, batch["decoder_segment_ids"][row],
                                          batch["decoder_positions"][row])
            np.testing.assert_array_equal(batch["decoder_loss_weights"][row], targets != 0)
            shifted = np.r_[0, targets[:-1]]
            shifted[:len(starts)][starts] = 0
            shifted[len(starts):] = 0
            np.testing.assert_array_equal(batch["decoder_input_tokens"][row], shifted)
            max_segments = max(max_segments, batch["encoder_segment_ids"][row].max())
    assert max_segments >= 3 if pack else max_segments == 1


def test_one_pass_reads_every_document_once(docs, rebuild_from_span_corruption):
    assert sorted(decoded_documents(batches(), rebuild_from_span_corruption)) == sorted(docs)


def test_input_shards_are_disjoint_and_complete(docs, rebuild_from_span_corruption):
    shards = [decoded_documents(batches(shuffle=True, seed=5, batch_size=16, num_shards=2,
                                        shard_indices=[index]), rebuild_from_span_corruption)
              for index in range(2)]
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(docs)


@pytest.mark.parametrize("repeat", [True, False])
def test_global_batches_do_not_depend_on_how_hosts_split_the_shards(docs, repeat):
    """One host reading 4 shards gets, row for row, what 2 or 4 hosts read together (their
    rows concatenated in host order), in training (endless) and in evaluation (one pass,
    where a host whose shards have run out feeds zero rows until every host's have)."""
    steps = 12  # Past one pass over the 45 documents.

    def read(shard_indices):
        iterator = pipeline.get_shard_batches(TASK, "train", LENGTHS, 8, shuffle=True, seed=3,
                                              repeat=repeat, pack=False, num_shards=4,
                                              shard_indices=shard_indices)
        return [next(iterator, None) for _ in range(steps)]

    one_host = read(range(4))
    for hosts in (2, 4):
        per_host = [read(range(h * 4 // hosts, (h + 1) * 4 // hosts)) for h in range(hosts)]
        for step in range(steps):
            if one_host[step] is None:
                assert all(host[step] is None for host in per_host)
                continue
            for key in pipeline.BATCH_KEYS:
                zeros = np.zeros_like(one_host[step][key][:8 // hosts])
                joined = np.concatenate([zeros if host[step] is None else host[step][key]
                                         for host in per_host])
                np.testing.assert_array_equal(joined, one_host[step][key], err_msg=key)
    real = [batch for batch in one_host if batch is not None]
    if repeat:
        assert len(real) == steps
    else:  # Unpacked: one document a row, each read once; 4 shards of 11-12 in 2-row batches.
        assert len(real) == 6 and one_host[6] is None
        assert sum(int(b["decoder_loss_weights"].any(axis=1).sum()) for b in real) == (
            NUM_DOCUMENTS)


def test_positions_saved_by_one_host_resume_on_two(docs):
    """A position saved by a host reading both shards, restored by two hosts reading one
    shard each, continues with exactly the batches the uninterrupted reader gives."""
    def reader(shard_indices):
        return pipeline.get_shard_batches(TASK, "train", LENGTHS, 8, shuffle=True, seed=4,
                                          repeat=True, num_shards=2, shard_indices=shard_indices)

    uninterrupted = reader([0, 1])
    for _ in range(5):
        next(uninterrupted)
    state = uninterrupted.state()
    assert sorted(state) == ["shard_00000-of-00002", "shard_00001-of-00002"]
    hosts = [reader([0]), reader([1])]
    for index, host in enumerate(hosts):
        host.restore({name: files for name, files in state.items()
                      if name == pipeline.shard_name(index, 2)})
    for _ in range(8):  # Past the 45 documents' first epoch.
        expected = next(uninterrupted)
        rows = [next(host) for host in hosts]
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), expected[key])


def test_last_batch_is_padded_with_zero_rows(docs):
    batch_list = batches(pack=False)
    assert len(batch_list) == -(-NUM_DOCUMENTS // 8)
    real_rows = NUM_DOCUMENTS % 8
    for key, value in batch_list[-1].items():
        assert np.all(value[real_rows:] == 0), key
        assert np.all(value[:real_rows].any(axis=1)), key
    assert sum(int(b["decoder_loss_weights"].any(axis=1).sum()) for b in batch_list) == (
        NUM_DOCUMENTS)


def test_shuffling_and_noise_follow_the_seed(docs):
    def first_batches(seed):
        iterator = pipeline.get_batches(TASK, "train", LENGTHS, 4, shuffle=True, seed=seed,
                                        repeat=True)
        return [next(iterator) for _ in range(3)]

    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    for a, b in zip(first, again):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["encoder_input_tokens"], c["encoder_input_tokens"])
               for a, c in zip(first, other))


def test_stdlib_byte_batches_are_corrupted_stdlib_source(rebuild_from_span_corruption):
    batch = batches(task="stdlib_span_corruption_bytes", split="validation", batch_size=4)[0]
    files = []
    for path in corpora.stdlib_files("validation"):
        with open(path, "rb") as f:
            files.append(f.read())
    for inputs, targets in segments([batch]):
        ids = rebuild_from_span_corruption(inputs[:-1], targets[:-1], BYTES.vocab_size)
        chunk = bytes(i - 3 for i in ids)
        assert len(chunk) >= 2 and any(chunk in source for source in files)


@pytest.mark.parametrize("lengths, key", [({"inputs": 64}, "'targets'"),
                                          ({"inputs": 1, "targets": 16}, "'inputs'")])
def test_bad_lengths_name_the_key(lengths, key):
    with pytest.raises(ValueError, match=key):
        pipeline.get_batches(TASK, "train", lengths, 8, shuffle=False, seed=0, repeat=False)


def test_sharded_shuffling_without_a_seed_is_rejected(docs):
    with pytest.raises(ValueError, match="needs a seed"):
        pipeline.get_shard_batches(TASK, "train", LENGTHS, 8, shuffle=True, seed=None,
                                   repeat=True, num_shards=2)


@pytest.mark.parametrize("pack", [True, False])
def test_decoder_only_rows_are_the_examples_inputs_then_targets(docs, pack):
    """The same examples in both families' layouts: each decoder-only segment is the
    encoder-decoder example's inputs then targets, its bidirectional prefix the start token
    and the inputs, its loss on the targets alone."""
    want = segments(batches(pack=pack))
    found = []
    for batch in batches(pack=pack, decoder_only=True):
        assert set(batch) == set(pipeline.DECODER_ONLY_KEYS)
        assert batch["decoder_target_tokens"].shape == (8, LENGTHS["inputs"] + LENGTHS["targets"])
        for row in range(8):
            ids = batch["decoder_segment_ids"][row]
            for segment in range(1, ids.max() + 1):
                tokens = batch["decoder_target_tokens"][row][ids == segment]
                weights = batch["decoder_loss_weights"][row][ids == segment]
                prefix = batch["decoder_causal_attention"][row][ids == segment]
                inputs_length = int(prefix.sum()) - 1
                assert prefix[:inputs_length + 1].all() and not prefix[inputs_length + 1:].any()
                assert not weights[:inputs_length].any() and weights[inputs_length:].all()
                found.append((tokens[:inputs_length], tokens[inputs_length:]))
    assert len(found) == len(want)
    for (inputs, targets), (want_inputs, want_targets) in zip(found, want):
        np.testing.assert_array_equal(inputs, want_inputs)
        np.testing.assert_array_equal(targets, want_targets)
