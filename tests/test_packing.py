"""Packing with isolation, the loss only where trained, and batches grouped by modality and length."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from conftest import LargestTensor, image_conversation, processor_for, text_conversation
from torch.utils._python_dispatch import TorchDispatchMode

from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.packing import PackedDataset, PackingBudget, plan_rows
from llava_lite.data.sampler import ModalityLengthSampler
from llava_lite.model import loss as loss_module
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset


def multi_turn(folder) -> Conversation:
    conversation = image_conversation(folder, ("a.jpg", "b.jpg"))
    conversation.messages[0] = Message("user", "<image>\nFirst, what is here?")
    conversation.messages[2] = Message("user", "<image>\nAnd in this one, is it safe?")
    return conversation


def samples_for(model, folder) -> list[dict]:
    processor = processor_for(model)
    conversations = [multi_turn(folder), text_conversation(), image_conversation(folder, ("b.jpg",))]
    return [processor.sample(c) for c in conversations]


def model_with(attention: str = "sdpa", **lm) -> LlavaLiteModel:
    torch.manual_seed(0)
    config = {"attn_implementation": attention}
    if lm:
        config["model_config"] = {**preset("tiny").language_model.model_config, **lm}
    return LlavaLiteModel.from_config(preset("tiny", language_model=config))


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_sample_never_sees_the_one_before_it(attention, image_folder):
    model = model_with(attention).eval()
    first, second, _ = samples_for(model, image_folder)
    collate = Collator(model.tokenizer.pad_token_id)
    changed = dict(first)
    vocab = len(model.tokenizer) - 1
    text = first["input_ids"] != model.image_token_id
    changed["input_ids"] = torch.where(text, (first["input_ids"] * 7 + 3) % vocab, first["input_ids"])
    changed["pixel_values"] = [torch.rand_like(p) for p in first["pixel_values"]]
    assert (changed["input_ids"][text] != first["input_ids"][text]).all()
    with torch.no_grad():
        before = model(**without_labels(collate([{"packed": [first, second]}]))).logits[0]
        after = model(**without_labels(collate([{"packed": [changed, second]}]))).logits[0]
    start = len(first["input_ids"])
    assert torch.equal(before[start:], after[start:])
    assert not torch.allclose(before[:start], after[:start])


def test_position_ids_restart_at_each_packed_sample_and_the_batch_has_no_attention_mask(tiny_model, image_folder):
    samples = samples_for(tiny_model, image_folder)
    batch = Collator(tiny_model.tokenizer.pad_token_id)([{"packed": samples}])
    lengths = [len(s["input_ids"]) for s in samples]
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected)
    assert "attention_mask" not in batch
    assert batch["image_tokens"].tolist() == [16, 16, 16]


def test_packed_items_make_one_row_without_padding_and_name_their_samples_boundaries(tiny_model, image_folder):
    first, second, third = samples_for(tiny_model, image_folder)
    lengths = [len(s["input_ids"]) for s in (first, second, third)]
    batch = Collator(tiny_model.tokenizer.pad_token_id)([{"packed": [first, second]}, {"packed": [third]}])
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    starts = batch["cu_seq_lens"][:-1].long()
    assert (batch["labels"][0, starts] == -100).all()  # no sample's first token is predicted from another's
    padded = Collator(tiny_model.tokenizer.pad_token_id, pad_to_multiple_of=64)([{"packed": [first, second]}])
    length = padded["input_ids"].shape[1]
    assert length % 64 == 0 and length > lengths[0] + lengths[1]
    assert padded["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], length]  # padding: its own


def test_packed_rows_under_sdpa_attend_one_sample_at_a_time(image_folder, monkeypatch):
    model = model_with("sdpa").eval()
    assert model.language_model.config._attn_implementation == "sdpa_varlen"
    samples = samples_for(model, image_folder)
    batch = without_labels(Collator(model.tokenizer.pad_token_id)([{"packed": samples}]))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[2], attn_mask is None, kwargs.get("is_causal")))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    tokens = batch["input_ids"].shape[1]
    with torch.no_grad(), SquareMasks(tokens) as varlen_masks:
        varlen = model(**batch).logits
    assert varlen_masks.made == 0  # no [tokens, tokens] mask is built
    with torch.no_grad():
        layers = model.language_model.config.num_hidden_layers
        lengths = [len(s["input_ids"]) for s in samples]
        assert calls == [(n, True, True) for n in lengths] * layers  # per sample: causal, unmasked
        model.language_model.set_attn_implementation("sdpa")  # transformers' block-diagonal mask over the row
        calls.clear()
        with SquareMasks(tokens) as masks:
            masked = model(**batch).logits
    assert masks.made > 0 and calls == [(sum(lengths), False, False)] * layers
    torch.testing.assert_close(varlen, masked, rtol=1e-5, atol=1e-5)


class SquareMasks(TorchDispatchMode):
    """How many boolean `[..., tokens, tokens]` tensors operations made while it was active."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens, self.made = tokens, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dtype == torch.bool
                and tensor.shape[-2:] == (self.tokens,) * 2
            ):
                self.made += 1
        return out


def test_an_attention_not_handed_the_boundaries_stops_rather_than_mix_packed_samples(image_folder, monkeypatch):
    model = model_with("sdpa").eval()
    attention = model.language_model.model.layers[0].self_attn
    forward = attention.forward

    def dropping(*args, **kwargs):  # as an LM that does not pass its keyword arguments on would
        kwargs.pop("cu_seq_lens_q"), kwargs.pop("cu_seq_lens_k")
        return forward(*args, **kwargs)

    monkeypatch.setattr(attention, "forward", dropping)
    batch = without_labels(Collator(model.tokenizer.pad_token_id)([{"packed": samples_for(model, image_folder)}]))
    with pytest.raises(RuntimeError, match="LlamaAttention was not handed cu_seq_lens.*data.packing false"):
        model(**batch)


def test_packed_samples_keep_a_sliding_window_under_varlen_sdpa(image_folder):
    mistral = {"model_type": "mistral", "sliding_window": 8, "head_dim": 16}
    torch.manual_seed(0)
    config = {"attn_implementation": "sdpa", "model_config": {**preset("tiny").language_model.model_config, **mistral}}
    model = LlavaLiteModel.from_config(preset("tiny", language_model=config)).eval()
    assert model.language_model.config._attn_implementation == "sdpa_varlen"
    samples = samples_for(model, image_folder)
    batch = without_labels(Collator(model.tokenizer.pad_token_id)([{"packed": samples}]))
    with torch.no_grad():
        varlen = model(**batch).logits
        model.language_model.set_attn_implementation("eager")  # transformers' sliding block-diagonal mask
        eager = model(**batch).logits
        model.language_model.config.sliding_window = None
        unwindowed = model(**batch).logits
    torch.testing.assert_close(varlen, eager, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eager, unwindowed, atol=1e-3)  # the window matters on these samples


@pytest.mark.parametrize("window", [None, 8])
def test_samples_sharing_a_prefix_see_what_they_would_see_written_after_it(window):
    lm = {"model_type": "mistral", "sliding_window": window, "head_dim": 16}
    model = model_with("sdpa", **lm).eval()
    generator = torch.Generator().manual_seed(0)
    prefix, answers = torch.randint(3, 500, (12,), generator=generator), [
        torch.randint(3, 500, (n,), generator=generator) for n in (5, 9, 1)
    ]
    lengths = [len(prefix), *map(len, answers)]
    shared = {
        "input_ids": torch.cat([prefix, *answers])[None],
        "position_ids": torch.cat([torch.arange(12)] + [torch.arange(12, 12 + len(a)) for a in answers])[None],
        "cu_seq_lens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        "segment_prefixes": torch.tensor([-1, 0, 0, 0], dtype=torch.int32),
    }
    with torch.no_grad():
        logits = model(**shared).logits[0].split(lengths)
        for answer, got in zip(answers, logits[1:]):
            alone = model(input_ids=torch.cat([prefix, answer])[None]).logits[0]
            torch.testing.assert_close(got, alone[12:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[0], alone[:12], rtol=1e-5, atol=1e-5)
    if window:  # the window reaches back into the prefix, and matters
        model.language_model.config.sliding_window = None
        with torch.no_grad():
            unwindowed = model(**shared).logits[0].split(lengths)
        assert not torch.allclose(unwindowed[2], logits[2], atol=1e-3)
    model.language_model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="segment_prefixes need .* sdpa_varlen, not eager"):
        model(**shared)


def test_a_new_models_first_batch_may_be_packed(image_folder):
    model = model_with("sdpa").train()  # the loss's one-time probe of the LM runs before the packed forward
    samples = samples_for(model, image_folder)
    packed = model(**Collator(model.tokenizer.pad_token_id)([{"packed": samples}])).loss
    unpacked = model(**Collator(model.tokenizer.pad_token_id)(samples)).loss
    assert abs(packed - unpacked) / unpacked < 1e-5


def test_a_padded_batch_under_varlen_sdpa_is_plain_sdpa(image_folder):
    model = model_with("sdpa").eval()
    batch = without_labels(Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder)))
    with torch.no_grad():
        varlen = model(**batch).logits
        model.language_model.set_attn_implementation("sdpa")
        plain = model(**batch).logits
    assert torch.equal(varlen, plain)


def trained_gradients(model: LlavaLiteModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_packed_and_unpacked_samples_give_the_same_loss_and_gradients(image_folder):
    model = model_with().train()
    samples = samples_for(model, image_folder)
    collate = Collator(model.tokenizer.pad_token_id)
    unpacked_loss, unpacked = trained_gradients(model, collate(samples))
    packed_loss, packed = trained_gradients(model, collate([{"packed": samples[:2]}, {"packed": samples[2:]}]))
    assert abs(packed_loss - unpacked_loss) / unpacked_loss < 1e-5
    for name, grad in unpacked.items():
        if grad.abs().sum() == 0:
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), packed[name].flatten(), dim=0)
        assert cosine > 0.99999, name


def test_the_loss_on_trained_positions_equals_the_loss_over_every_position(image_folder):
    model = model_with(tie_word_embeddings=False).train()
    batch = Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder))
    batch["num_items_in_batch"] = torch.tensor(50)  # as the Trainer passes it under accumulation
    ours_loss, ours = trained_gradients(model, batch)
    model.loss_kernel = "full"
    full_loss, full = trained_gradients(model, batch)
    assert abs(ours_loss - full_loss) / full_loss < 1e-6
    for name, grad in full.items():
        assert (ours[name] - grad).norm() <= 1e-6 * grad.norm(), name


def test_logits_of_every_position_are_never_held_whole(image_folder, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 2**18)
    vocab = 32000
    model = model_with(vocab_size=vocab).train()
    batch = Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder))
    all_logits = batch["input_ids"].numel() * vocab
    with LargestTensor() as ours:
        model(**batch).loss.backward()
    model.loss_kernel = "full"
    with LargestTensor() as full:
        model(**batch).loss.backward()
    assert full.largest >= all_logits  # what the plain head holds
    assert ours.largest < all_logits / 4  # the embedding table (vocab x 64) is the largest tensor left


def test_an_lm_whose_logits_are_more_than_its_head_keeps_its_own_loss(image_folder, caplog):
    model = model_with()
    lm_forward = model.language_model.forward

    def scaled(*args, **kwargs):  # as LMs with a logit scale or soft-capping do after their head
        out = lm_forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.language_model.forward = scaled
    batch = Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder))
    with caplog.at_level("INFO", logger="llava_lite"):
        out = model(**batch)
        model(**batch)
    assert out.logits is not None and torch.isfinite(out.loss)  # the LM's own path, over every position
    assert sum("the loss uses the LM's own head" in r.getMessage() for r in caplog.records) == 1


def test_the_packer_is_deterministic_never_splits_and_keeps_to_its_budget():
    rng = random.Random(3)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    images = [rng.choice([0, 1, 1, 2]) for _ in range(500)]
    budget = PackingBudget(tokens=512, images=3)
    rows = plan_rows(lengths, images, budget, window=128, seed=7)
    assert rows == plan_rows(lengths, images, budget, window=128, seed=7)
    assert rows != plan_rows(lengths, images, budget, window=128, seed=8)
    assert sorted(i for row in rows for i in row) == list(range(500))  # each sample once, whole
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert all(sum(images[i] for i in row) <= 3 for row in rows)
    tokens_only = plan_rows(lengths, images, PackingBudget(tokens=512), window=128, seed=7)
    assert sum(lengths) / (len(tokens_only) * 512) > 0.95  # rows nearly full


def test_a_sample_longer_than_the_budget_gets_a_row_of_its_own():
    rows = plan_rows([700, 10, 20], [0, 0, 0], PackingBudget(tokens=512), seed=0)
    assert sorted(map(sorted, rows)) == [[0], [1, 2]]


def test_packed_rows_skip_bad_records(tiny_model, image_folder):
    (image_folder / "bad.jpg").write_bytes(b"not an image")
    conversations = [image_conversation(image_folder), image_conversation(image_folder, ("bad.jpg",))] * 3
    conversations.append(Conversation([Message("user", "<image> no image given")], source="broken"))
    dataset = ConversationDataset(conversations, processor_for(tiny_model), on_bad_record="skip")
    packed = PackedDataset(dataset, PackingBudget(tokens=4096), seed=0)
    assert sum(len(row) for row in packed.rows) == 6  # the record without its image is left out
    items = [packed[i] for i in range(len(packed))]
    assert sum(len(item["packed"]) for item in items) == 3  # the corrupt images fail when loaded
    assert dataset.skips.counts() == {"image_count_mismatch": 1, "corrupt_image": 3}


def test_modality_length_batches_hold_one_modality_and_cover_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(203)]
    images = [rng.choice([0, 1]) for _ in range(203)]
    sampler = ModalityLengthSampler(lengths, images, group_size=8, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    groups = [order[i : i + 8] for i in range(0, len(order), 8)]
    mixed = [g for g in groups if len({images[i] > 0 for i in g}) > 1]
    assert len(mixed) <= 1  # at most the leftovers of the last group of one modality meet the other's
    assert order == list(sampler)
    sampler.set_epoch(1)
    assert order != list(sampler)

    # Neighbours are of similar length: far less padding than in a random order.
    def padding(sequence):
        chunks = [sequence[i : i + 8] for i in range(0, len(sequence), 8)]
        return sum(max(lengths[i] for i in c) * len(c) - sum(lengths[i] for i in c) for c in chunks)

    assert padding(order) < padding(random.Random(0).sample(range(203), 203)) / 3


def test_the_liger_kernel_is_refused_in_one_line_where_it_cannot_run(tmp_path):
    from llava_lite.config_io import from_dict
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.recipes import resolved
    from llava_lite.train.trainable_model import build_training_model

    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel"):
        pytest.fail("this check is for machines where liger-kernel cannot run; here it can")
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path),
            "data": {"sources": [{"path": "unused.json"}]},
            "train": {"loss_kernel": "liger"},
        },
    )
    with pytest.raises(ValueError, match="^train.loss_kernel liger needs the liger-kernel package and a CUDA GPU$"):
        build_training_model(resolved(config))


@pytest.mark.parametrize("frozen", ["nothing", "head"])
def test_the_chunked_loss_gives_the_full_heads_gradients_with_a_bias_and_makes_none_without_grad(frozen, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 97)  # chunks of 3 positions, the last one shorter
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97)
    head.requires_grad_(frozen != "head")
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 97, (2, 9))
    labels[0, :4] = -100

    def gradients(loss):
        hidden.grad = head.weight.grad = head.bias.grad = None
        loss.backward()
        return [t.grad for t in (hidden, head.weight, head.bias)]

    ours = gradients(ours_loss := loss_module.trained_positions_loss(hidden, head, labels, num_items_in_batch=7))
    logits = head(hidden)[:, :-1].flatten(0, 1)
    full = gradients(
        full_loss := torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum") / 7
    )
    torch.testing.assert_close(ours_loss, full_loss, rtol=1e-6, atol=0)
    for mine, theirs in zip(ours, full, strict=True):
        assert (mine is None) == (theirs is None) == (frozen == "head" and mine is not ours[0])
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), LargestTensor() as made:
        assert loss_module.trained_positions_loss(hidden, head, labels, num_items_in_batch=7) == ours_loss
    chunks = -(-int((labels[:, 1:] != -100).sum()) // 3)
    assert made.calls["mm"] == chunks and "addmm_" not in made.operations  # the logits' products, no gradient's
