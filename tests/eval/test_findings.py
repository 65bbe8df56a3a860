"""Finding-classification tasks (chexpert, padchest, chestxray14 and their which-findings forms) end to
end: releases built from torchxrayvision's real label files, a tiny in-process model with logit-based
P(yes), a scripted OpenAI-compatible peer with ``logprobs``, and predictions files."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cxr_releases import chestxray14_release, chexpert_release, padchest_release

from emma.data.sources import run_importer
from emma.data.store import open_dataset
from emma.eval.extract import extract_findings
from emma.eval.findings import FindingPair, PairTable, yes_probability
from emma.eval.runner import EvalOptions, build_request, run_eval
from emma.eval.stats import cluster_bootstrap_cis
from emma.eval.tasks import TASKS, get_task
from emma.infer.types import GenerationRequest, GenerationResponse

TINY_FAMILY = "llava_onevision"


@pytest.fixture(scope="module")
def chexpert_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chexpert")
    src, _ = chexpert_release(root, n_train=40, n_valid=80)
    run_importer("chexpert", src, root / "ds")
    return root / "ds"


def items_of(task: str, ds: Path, split: str) -> tuple[list[Any], dict[str, int]]:
    skipped: dict[str, int] = {}
    items = list(get_task(task).items(open_dataset(ds).iter_samples(split), skipped))
    return items, skipped


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ pieces


def test_extract_findings_reads_lists_and_refuses_sentences() -> None:
    options = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "Pleural_Thickening"]
    assert extract_findings("Cardiomegaly, pleural effusion.", options).value == (1, 2)
    assert extract_findings("pleural thickening and atelectasis", options).value == (0, 3)
    assert extract_findings("- Cardiomegaly\n- Cardiomegaly", options).value == (1,)
    assert extract_findings("None of the above.", options).value == ()
    assert extract_findings("<answer>none</answer>", options).value == ()
    for text in ("There is cardiomegaly.", "cardiomegaly, maybe edema", "no", "effusion"):
        assert extract_findings(text, options).status == "unparseable", text
    assert extract_findings("  ", options).status == "empty"


def test_yes_probability() -> None:
    p, one_sided = yes_probability({"yes": math.log(0.6), "no": math.log(0.2)})
    assert p == pytest.approx(0.75) and not one_sided
    assert yes_probability({"yes": -0.1}) == (1.0, True)
    assert yes_probability({"no": -0.1}) == (0.0, True)
    assert yes_probability({}) == (None, False) and yes_probability(None) == (None, False)


def test_pair_metrics_match_a_direct_count() -> None:
    rng = np.random.default_rng(3)
    pairs = []
    for img in range(40):
        for f in ("a", "b", "c"):
            gold = int(rng.random() < 0.4)
            pred = None if rng.random() < 0.1 else int(rng.random() < 0.5)
            pairs.append(FindingPair(f"i{img}", f, gold, pred, float(rng.random())))
    m = PairTable(pairs, ("a", "b", "c")).metrics()
    f1s = []
    for f in ("a", "b", "c"):
        sub = [p for p in pairs if p.finding == f]
        tp = sum(p.gold == 1 and p.pred == 1 for p in sub)
        fp = sum(p.gold == 0 and p.pred == 1 for p in sub)
        fn = sum(p.gold == 1 and p.pred != 1 for p in sub)  # unparseable positives are misses
        f1s.append(2 * tp / (2 * tp + fp + fn))
        assert m[f"f1.{f}"] == pytest.approx(f1s[-1])
        pos = [p.score for p in sub if p.gold == 1]
        neg = [p.score for p in sub if p.gold == 0]
        auc = np.mean([(x > y) + 0.5 * (x == y) for x in pos for y in neg])
        assert m[f"auroc.{f}"] == pytest.approx(auc)
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["accuracy"] == pytest.approx(np.mean([p.pred == p.gold for p in pairs]))


def test_cluster_bootstrap_resamples_whole_clusters() -> None:
    values = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    cluster = np.array([0, 0, 1, 1, 2, 2])

    def stat(counts: np.ndarray) -> dict[str, float]:
        w = counts[cluster]
        out = {"mean": float((w * values).sum() / w.sum())}
        if counts[2] == 0:
            out["only_with_2"] = 1.0  # undefined in replicates that draw cluster 2
        return out

    cis = cluster_bootstrap_cis(3, stat, n_resamples=500, seed=1)
    lo, hi = cis["mean"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # cluster 0 is all ones, cluster 1 all zeros: a replicate's mean is a multiple of 1/6
    reps = []
    rng = np.random.default_rng(1)
    for _ in range(500):
        counts = np.bincount(rng.integers(0, 3, size=3), minlength=3)
        reps.append(stat(counts)["mean"])
    assert (lo, hi) == tuple(np.quantile(reps, [0.025, 0.975]))
    assert cis["only_with_2"] == (1.0, 1.0)


def test_registry_has_the_published_finding_sets() -> None:
    assert TASKS["chexpert"].findings == (
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    )
    assert len(TASKS["chexpert-14"].findings) == 14 and len(TASKS["chestxray14"].findings) == 14
    assert len(TASKS["padchest"].findings) == 12
    assert TASKS["chexpert"].logprob_words == ("yes", "no") and not TASKS["chexpert-which"].logprob_words


# ------------------------------------------------------------------------------- predictions files


def test_chexpert_questions_filters_and_scores_from_a_file(chexpert_ds: Path, tmp_path: Path) -> None:
    items, skipped = items_of("chexpert", chexpert_ds, "validation")
    samples = {s.id: s for s in open_dataset(chexpert_ds).iter_samples("validation")}
    frontal = [s for s in samples.values() if s.meta.extra["view"] == "frontal"]
    assert skipped.get("lateral view", 0) == len(samples) - len(frontal) > 0
    expected = sum(s.gold.labels.get(f) in (0, 1) for s in frontal for f in get_task("chexpert").findings)
    assert len(items) == expected and skipped.get("unknown label", 0) == 5 * len(frontal) - expected
    first = items[0]
    assert first.prompt == "Does this chest X-ray show atelectasis?\nAnswer yes or no."
    # answers: right on even items, wrong on odd ones, one garbage, one missing; logprobs on all
    rows = []
    for k, it in enumerate(items[:-1]):
        gold = it.sample.gold.answer
        answer = gold if k % 2 == 0 else ("no" if gold == "yes" else "yes")
        if k == 3:
            answer = "The image is abnormal"
        lp = {"yes": math.log(0.9), "no": math.log(0.1)} if gold == "yes" else {"yes": -3.0, "no": -0.05}
        rows.append({"id": it.id, "prediction": answer, "logprobs": lp})
    run = run_eval(
        EvalOptions(
            task="chexpert",
            data=chexpert_ds,
            predictions=write_predictions(tmp_path / "p.jsonl", rows),
            out=tmp_path / "run",
            n_resamples=200,
        )
    )
    m, c = run.results["metrics"], run.results["counts"]
    correct = sum(1 for k in range(len(items) - 1) if k % 2 == 0 and k != 3)
    assert m["accuracy"] == pytest.approx(correct / len(items))
    assert c["unparseable"] == 1 and c["missing"] == 1
    assert m["unparseable"] == pytest.approx(2 / len(items))
    assert m["macro_auroc"] == 1.0  # the log-probabilities separate the classes perfectly
    assert c["auroc_scored"] == len(items) - 1 and c["auroc_no_score"] == 1
    for name in ("macro_f1", "accuracy", "macro_auroc"):
        lo, hi = run.results["ci95"][name]
        assert lo <= m[name] <= hi
    by_finding = run.results["breakdowns"]["question_type"]
    assert set(by_finding) == {
        f for f in get_task("chexpert").findings if any(it.sample.meta.question_type == f for it in items)
    }
    row = next(r for r in run.rows if r["id"] == items[0].id)
    assert row["extracted"]["p_yes"] == pytest.approx(
        0.9 if items[0].sample.gold.answer == "yes" else 1 / (1 + math.exp(3.0 - 0.05))
    )
    assert run.results["config"]["task"]["findings"][0] == "Atelectasis"


def test_which_form_perfect_none_and_unparseable(tmp_path: Path) -> None:
    src, _ = chestxray14_release(tmp_path, n=150)
    run_importer("chestxray14", src, tmp_path / "ds")
    items, _ = items_of("chestxray14-which", tmp_path / "ds", "test")
    assert items and all(len(it.sample.gold.options) == 14 for it in items)
    assert "pleural thickening" in items[0].prompt
    rows = [{"id": it.id, "prediction": it.sample.gold.answer} for it in items]
    run = run_eval(
        EvalOptions(
            task="chestxray14-which",
            data=tmp_path / "ds",
            predictions=write_predictions(tmp_path / "p.jsonl", rows),
            out=tmp_path / "perfect",
            n_resamples=100,
        )
    )
    assert run.results["metrics"]["exact_match"] == 1.0 and run.results["metrics"]["accuracy"] == 1.0
    assert run.results["metrics"]["macro_f1"] == 1.0 and "macro_auroc" not in run.results["metrics"]
    # everyone says "none": every negative pair right, every positive missed; one sentence unparseable
    rows = [{"id": it.id, "prediction": "None."} for it in items]
    rows[0]["prediction"] = "I think there is an effusion"
    run = run_eval(
        EvalOptions(
            task="chestxray14-which",
            data=tmp_path / "ds",
            predictions=write_predictions(tmp_path / "none.jsonl", rows),
            out=tmp_path / "none",
            n_resamples=100,
        )
    )
    pairs = [(f, v) for it in items for f, v in it.sample.gold.labels.items()]
    first_pairs = len(items[0].sample.gold.labels)
    negatives_right = sum(v == 0 for _, v in pairs) - sum(
        v == 0 for v in items[0].sample.gold.labels.values()
    )
    assert run.results["metrics"]["accuracy"] == pytest.approx(negatives_right / len(pairs))
    assert run.results["metrics"]["macro_f1"] == 0.0
    assert run.results["counts"]["unparseable"] == 1 and first_pairs == 14
    assert run.rows[0]["parse_status"] == "unparseable" and run.rows[0]["correct"] is False


def test_padchest_task_keeps_physician_labelled_frontal_images(tmp_path: Path) -> None:
    src, _ = padchest_release(tmp_path, n=300)
    run_importer("padchest", src, tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds")
    split = max(
        ds.splits,
        key=lambda s: sum(
            x.meta.extra["label_method"] == "Physician" and x.meta.extra["view"] == "frontal"
            for x in ds.iter_samples(s)
        ),
    )
    items, skipped = items_of("padchest", tmp_path / "ds", split)
    kept = [
        s
        for s in ds.iter_samples(split)
        if s.meta.extra["label_method"] == "Physician" and s.meta.extra["view"] == "frontal"
    ]
    assert len(items) == 12 * len(kept) > 0
    assert sum(skipped.values()) == ds.count(split) - len(kept)


# ------------------------------------------------------------------------------ in-process engine


@pytest.fixture(scope="module")
def tiny_engine() -> Any:
    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.tiny_families import load_tiny

    return TransformersEngine(load_tiny(TINY_FAMILY), max_batch_size=4)


def _first_token_logprob(engine: Any, request: GenerationRequest, word: str) -> float:
    """log P(word) at the first answer position from one unbatched forward pass of the model."""
    processor = engine.processor
    inputs = processor.apply_chat_template(
        [engine.conversation(request.messages)],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = engine.model(**inputs).logits[0, -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = engine.word_token_ids(word)
    return float(torch.logsumexp(logp[ids], dim=0))


def test_tiny_model_end_to_end_with_logit_auroc(chexpert_ds: Path, tiny_engine: Any, tmp_path: Path) -> None:
    tok = tiny_engine.tokenizer
    yes_ids = tiny_engine.word_token_ids("yes")
    for variant in ("yes", "Yes", " yes", " Yes"):
        ids = tok.encode(variant, add_special_tokens=False)
        if len(ids) == 1:
            assert ids[0] in yes_ids
    assert all(tok.decode([i]).strip().lower() == "yes" for i in yes_ids) and len(yes_ids) >= 2

    opts = EvalOptions(
        task="chexpert",
        data=chexpert_ds,
        model="tiny",
        out=tmp_path / "run",
        limit=10,
        batch_size=4,
        max_new_tokens=3,
        n_resamples=100,
    )
    run = run_eval(opts, engine=tiny_engine)
    c = run.results["counts"]
    assert run.results["n"] == 10 and c["auroc_scored"] == 10 and c["auroc_no_score"] == 0
    for row in run.rows:
        p = row["extracted"]["p_yes"]
        assert 0.0 < p < 1.0
        if row["parse_status"] != "ok":
            assert row["correct"] is False and row["values"]["accuracy"] == 0.0
    assert c["unparseable"] + c["empty"] == sum(r["parse_status"] != "ok" for r in run.rows)
    # P(yes) is the model's own first-token distribution: recompute it without batching or generate()
    items, _ = items_of("chexpert", chexpert_ds, "validation")
    dataset = open_dataset(chexpert_ds)
    for item, row in list(zip(items, run.rows))[:3]:
        images = [dataset.open_image(r).convert("RGB") for r in item.images]
        request = build_request(item, images, get_task("chexpert").decoding)
        lp_yes = _first_token_logprob(tiny_engine, request, "yes")
        lp_no = _first_token_logprob(tiny_engine, request, "no")
        assert row["extracted"]["p_yes"] == pytest.approx(1 / (1 + math.exp(lp_no - lp_yes)), abs=1e-4)
    # the probabilities are cached with the predictions: a rerun generates nothing, same AUROC inputs
    again = run_eval(opts, engine=tiny_engine)
    assert again.results["generation"]["from_cache"] == 10
    assert [r["extracted"] for r in again.rows] == [r["extracted"] for r in run.rows]


# ------------------------------------------------------------------------- OpenAI-compatible peer


class _LogprobPeer(BaseHTTPRequestHandler):
    """Answers "Yes" with top_logprobs, or "No" listing only "No" (a one-sided first token)."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = self.server.state  # type: ignore[attr-defined]
        with state["lock"]:
            state["bodies"].append(body)
            k = len(state["bodies"])
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else content[-1]["text"]
        if "cardiomegaly" in text:
            top = [("No", -2.5), (" no", -3.0), ("Yes", -0.2), ("Maybe", -4.0)]
            answer = "Yes"
        else:
            top = [("No", -0.1), ("Perhaps", -3.2)]
            answer = "No"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
        }
        if body.get("logprobs") and k % 7:  # every 7th answer comes without logprobs
            choice["logprobs"] = {
                "content": [
                    {
                        "token": answer,
                        "logprob": dict(top)[answer],
                        "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top],
                    }
                ]
            }
        payload = json.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_openai_engine_reads_logprobs_and_the_run_scores_them(
    loopback_http: Callable[[type[BaseHTTPRequestHandler], Any], str], chexpert_ds: Path, tmp_path: Path
) -> None:
    from emma.infer.openai_engine import OpenAIEngine

    state: dict[str, Any] = {"lock": threading.Lock(), "bodies": []}
    engine = OpenAIEngine(loopback_http(_LogprobPeer, state), "peer", concurrency=2)
    [yes] = engine.generate([_text_request("Is there cardiomegaly?")])
    assert yes.text == "Yes"
    assert yes.word_logprobs is not None
    assert yes.word_logprobs["yes"] == pytest.approx(-0.2)
    assert yes.word_logprobs["no"] == pytest.approx(np.logaddexp(-2.5, -3.0))
    assert state["bodies"][0]["logprobs"] is True and state["bodies"][0]["top_logprobs"] == 20
    [plain] = engine.generate([GenerationRequest([_user("hello")])])
    assert plain.word_logprobs is None and "logprobs" not in state["bodies"][1]

    run = run_eval(
        EvalOptions(
            task="chexpert",
            data=chexpert_ds,
            model="openai:peer",
            out=tmp_path / "run",
            limit=20,
            n_resamples=100,
        ),
        engine=engine,
    )
    c = run.results["counts"]
    assert c["auroc_scored"] + c["auroc_no_score"] == 20
    assert c["auroc_no_score"] >= 1  # answers that came without logprobs have no score, never a guess
    assert c["auroc_one_sided"] >= 1  # "No" answers list no "yes": P(yes) = 0
    for row in run.rows:
        if row["extracted"]["p_yes"] is not None and "cardiomegaly" not in row["prompt"]:
            assert row["extracted"]["p_yes"] == 0.0


def _user(text: str) -> Any:
    from emma.infer.types import Message

    return Message.text("user", text)


def _text_request(text: str) -> GenerationRequest:
    return GenerationRequest([_user(text)], logprob_words=("yes", "no"))


def test_prediction_file_logprobs_are_validated(tmp_path: Path) -> None:
    from emma.eval.predictions import read_prediction_file

    path = write_predictions(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prediction": "yes", "logprobs": {"yes": -0.1, "no": -2.0}},
            {"id": "b", "prediction": "no", "logprobs": {"yes": "high"}},
            {"id": "c", "prediction": "no", "logprobs": {"yes": 0.5}},
            {"id": "d", "prediction": "no"},
        ],
    )
    pf = read_prediction_file(path)
    assert pf.logprobs == {"a": {"yes": -0.1, "no": -2.0}}
    assert pf.invalid_lines == [2, 3] and set(pf.predictions) == {"a", "d"}


def test_generation_response_defaults() -> None:
    assert GenerationResponse("r", "x", "stop").word_logprobs is None


def test_engine_reports_word_logprobs_only_when_asked(tiny_engine: Any) -> None:
    from PIL import Image

    from emma.infer.types import ImagePart, Message, SamplingParams, TextPart

    image = Image.new("RGB", (32, 32), (90, 40, 40))

    def request(words: tuple[str, ...]) -> GenerationRequest:
        content = [ImagePart(image), TextPart("Is there an effusion?")]
        return GenerationRequest(
            [Message("user", content)], SamplingParams(max_new_tokens=2), logprob_words=words
        )

    asked, plain, odd = tiny_engine.generate(
        [request(("yes", "no")), request(()), request(("yes", "zzqxjv-not-a-token"))]
    )
    assert plain.word_logprobs is None
    assert set(asked.word_logprobs) == {"yes", "no"} and all(v < 0 for v in asked.word_logprobs.values())
    assert odd.word_logprobs == {"yes": pytest.approx(asked.word_logprobs["yes"], abs=1e-5)}
    assert asked.text == plain.text  # asking for log-probabilities does not change the answer
