"""DPO through the trainer (train/preference.py, data/preference.py) on the qwen2_tied fixture.

References: a separate frozen copy of the pretrained model as DPO's reference, run live in the same step (the
textbook setup): LoRA-DPO with the base-as-reference (adapters off) and full-fine-tune DPO with the cached
reference must both equal it step by step (loss and every metric within 1e-5). Labels are checked against the
tokenizer's own encoding of prompt and response."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
QWEN2 = FIXTURES / "qwen2_tied"
pytestmark = pytest.mark.skipif(not QWEN2.is_dir(), reason="shared fixtures absent: ../shared/fixtures/hf")
PAIRS = [("春眠不覺曉", "處處聞啼鳥", "白日依山盡"), ("床前明月光", "疑是地上霜", "黃河入海流"),
         ("紅豆生南國", "春來發幾枝", "欲窮千里目"), ("千山鳥飛絕", "萬徑人蹤滅", "更上一層樓"),
         ("獨坐幽篁裡", "彈琴復長嘯", "孤帆遠影碧"), ("空山不見人", "但聞人語響", "唯見長江天"),
         ("君自故鄉來", "應知故鄉事", "煙花三月下"), ("移舟泊煙渚", "日暮客愁新", "故人西辭黃")]
STEPS = 3


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    text = folder / "pairs.jsonl"
    text.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                            for p, c, r in PAIRS), encoding="utf-8")
    return folder, text


def _recipe(folder: Path, data: Path, run: str, *extra: str):
    return compose_recipe([f"model.pretrained={QWEN2}", "objective=dpo", f"data.path={data}", "data.seq_len=32",
                           f"data.cache_dir={folder / 'cache'}", "data.val_fraction=0.25", "train.global_batch_size=2",
                           f"train.num_steps={STEPS}", f"train.output_dir={folder / run}", "train.progress=false",
                           "train.sample_tokens=0", "optim.lr=5e-3", "optim.warmup_steps=0",
                           "objective.preference.beta=0.5", "objective.preference.sft_weight=0.1", *extra])


def _frozen_copy(recipe):
    from ascend_llm.interop.pretrained import load_pretrained_weights
    from ascend_llm.models import build_model

    model = build_model(recipe.model, seed=recipe.train.seed)
    load_pretrained_weights(model, recipe.model)
    for param in model.get_parameters():
        param.requires_grad = False
        param.name = "reference." + param.name  # one graph holds both models: names must differ
    return model


def _run(recipe, reference=None, steps: int = STEPS) -> list[list[float]]:
    """Per step: [loss, *aux] of `steps` trainer steps; `reference`: a live frozen reference model instead."""
    from ascend_llm.train.session import build_session
    from ascend_llm.train.trainer import run_step

    session = build_session(recipe)
    if reference is not None:
        session.objective.reference = reference  # before the first step compiles
    return [[o.loss, *o.aux.values()] for o in (run_step(session, s) for s in range(steps))]


def test_lora_dpo_base_as_reference_equals_a_frozen_copy(pairs_file):
    folder, data = pairs_file
    lora = ("lora.enabled=true", "lora.rank=4", "lora.targets=[wq,wv,w1]")
    recipe = _recipe(folder, data, "lora_a", *lora)
    assert recipe.objective.preference.reference == "auto"
    ours = _run(recipe)
    textbook = _run(_recipe(folder, data, "lora_b", *lora), _frozen_copy(recipe))
    np.testing.assert_allclose(ours, textbook, rtol=1e-5, atol=1e-5)
    assert abs(ours[0][0] - np.log(2) - 0.1 * ours[0][-1]) < 1e-5  # policy == reference at step 1: log 2 + SFT
    assert ours[-1][3] != 0.0  # rewards/margins moved: the adapters train


def test_full_dpo_cached_reference_is_the_initial_model_and_is_reused(pairs_file):
    """At step 1 the policy is the initial model: with the cached reference every reward is exactly 0 and the
    loss is log 2 (+ the SFT term), on every pair of the batch (a misplaced cache row would break this)."""
    from ascend_llm.data.preference import prepare_preference
    from ascend_llm.train.preference import reference_key
    from ascend_llm.train.session import build_session

    folder, data = pairs_file
    recipe = _recipe(folder, data, "full_a", "train.global_batch_size=6")
    first = _run(recipe, steps=1)[0]  # only step 1 is read
    assert first[1:4] == [0.0, 0.0, 0.0]  # rewards/chosen, rewards/rejected, rewards/margins
    assert abs(first[0] - np.log(2) - 0.1 * first[-1]) < 1e-6
    cache = sorted((folder / "cache" / "reference").glob("*.npy"))
    assert len(cache) == 1
    stamp, values = cache[0].stat().st_mtime_ns, np.load(cache[0])
    session = build_session(_recipe(folder, data, "full_b"))  # the same model and data: read, not recomputed
    assert cache[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(session.objective.dataset.reference, values)
    # any change of model, data, seq_len or template is another key, so a stale file is never used
    other = _recipe(folder, data, "full_c", "data.seq_len=24")
    assert reference_key(session.model, prepare_preference(recipe.data), recipe) != reference_key(
        session.model, prepare_preference(other.data), other)


def test_prompt_tokens_are_masked_text_and_chat(pairs_file):
    from ascend_llm.data.preference import PreferenceDataset, prepare_preference
    from ascend_llm.tokenizer.hf import HFTokenizer

    folder, text = pairs_file
    tok = HFTokenizer(QWEN2)
    chat = folder / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "chosen": c,
                                        "rejected": [{"role": "assistant", "content": r}]}, ensure_ascii=False) + "\n"
                            for p, c, r in PAIRS), encoding="utf-8")
    for data, learned in ((text, lambda s: s + "<|endoftext|>"), (chat, lambda s: s + "<|im_end|>\n")):
        recipe = _recipe(folder, data, "unused", "data.seq_len=48")
        dataset = PreferenceDataset(prepare_preference(recipe.data), 0.0, 0)
        tokens, labels = dataset.arrays(np.arange(len(PAIRS)))
        for row, (_, chosen, rejected) in enumerate(PAIRS):
            # the learned tokens are exactly the response (+ its end token); the prompt and padding are -100
            order = dict(zip(dataset.pair_ids.tolist(), range(len(PAIRS))))
            k = order[row]
            for side, answer in ((k, chosen), (k + len(PAIRS), rejected)):
                assert tok.decode(labels[side][labels[side] != -100].tolist()) == learned(answer)
            if data == text:  # both rows share the prompt's ids (tokenized apart from the response)
                prompt = tok.encode(PAIRS[row][0], False)
                assert tokens[k][:len(prompt)].tolist() == prompt == tokens[k + len(PAIRS)][:len(prompt)].tolist()


def test_chat_prompt_with_earlier_answers_scores_only_the_response(pairs_file):
    """A multi-turn prompt (an earlier assistant answer included) under Qwen3's official template: only the
    response's tokens are scored, not the earlier answer."""
    from ascend_llm.data.preference import PairEncoder
    from ascend_llm.tokenizer.hf import HFTokenizer

    tok = HFTokenizer(FIXTURES / "qwen3_qknorm")
    tok.chat_template = (Path(__file__).parent / "data" / "chat_templates" / "qwen3_official.jinja").read_text()
    prompt = [{"role": "user", "content": "上句"}, {"role": "assistant", "content": "床前明月光"},
              {"role": "user", "content": "下句"}]
    (ids, flags), _ = PairEncoder(tok, tok.tokenizer.token_to_id("<|im_end|>")).encode(
        {"prompt": prompt, "chosen": "疑是地上霜", "rejected": "黃河入海流"})
    assert tok.decode([i for i, f in zip(ids, flags) if f]) == "<think>\n\n</think>\n\n疑是地上霜<|im_end|>\n"


def test_unsupported_setups_are_refused_in_one_line(pairs_file):
    from ascend_llm.errors import ConfigError
    from ascend_llm.train.preference import build_objective

    folder, data = pairs_file
    with pytest.raises(ConfigError, match=r"objective\.preference\.reference"):
        build_objective(_recipe(folder, data, "unused", "objective.preference.reference=adapters_off"), None)
    with pytest.raises(ConfigError, match=r"objective\.preference\.label_smoothing"):
        _recipe(folder, data, "unused", "objective.preference.loss=ipo", "objective.preference.label_smoothing=0.1")


def test_adapters_off_view_is_the_base_model_for_dense_and_expert_lora():
    """The reference view of a LoRA model (dense LoraDense and MoE GroupedLora adapters, made non-zero) computes
    exactly the model before LoRA, while sharing every parameter with the adapted model."""
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.models import build_model
    from ascend_llm.train.build import build_converters
    from ascend_llm.train.preference import adapters_off_view

    recipe = compose_recipe(["model=debug_moe", "lora.enabled=true", "lora.rank=4", "lora.targets=[wq,w1,w2,w3]"])
    model = build_model(recipe.model, seed=0)
    model.return_aux_loss = False
    tokens = Tensor(np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int32))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        before = model(tokens).asnumpy()
        model = build_converters(recipe).convert(model)
        rng = np.random.default_rng(1)
        for param in model.trainable_params():
            if "lora_b" in param.name:
                param.set_data(Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
        view = adapters_off_view(model)
        np.testing.assert_array_equal(view(tokens).asnumpy(), before)
        assert np.abs(model(tokens).asnumpy() - before).max() > 0.1
        assert {id(p) for p in view.get_parameters()} <= {id(p) for p in model.get_parameters()}
    finally:
        ms.set_context(mode=mode)


def test_prepare_cli_prepares_the_pairs_train_reads(pairs_file, capsys, tmp_path):
    """`ascend-llm prepare objective=dpo ...` tokenizes the pairs into the directory `train` reads (the same key),
    and refuses --output in one line (exit 2): pairs live in data.cache_dir."""
    from ascend_llm.cli.main import main
    from ascend_llm.data.preference import prepare_preference

    folder, data = pairs_file
    cache = tmp_path / "cache"
    argv = ["prepare", "objective=dpo", f"model.pretrained={QWEN2}", f"data.path={data}", "data.seq_len=32",
            f"data.cache_dir={cache}", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "preference" and printed["report"]["pairs"] == len(PAIRS)
    recipe = _recipe(folder, data, "unused", f"data.cache_dir={cache}")
    assert prepare_preference(recipe.data).path == Path(printed["path"])
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "--output" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # without model.pretrained there is no tokenizer: the line names data.tokenizer and its (empty) value, not the
    # pairs file's path
    assert main(["prepare", "objective=dpo", f"data.path={data}", f"data.cache_dir={cache}", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.tokenizer" in lines[0] and str(data) not in lines[0], lines
