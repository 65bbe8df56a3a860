"""The evaluation runner on real VQA-RAD: predictions files, a tiny real model, resume, ablation, compare."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from emma.data.sources import run_importer
from emma.errors import DataFormatError, InputError
from emma.eval.ablate import noise_like, shuffle_donors
from emma.eval.predictions import PredictionCache, read_prediction_file
from emma.eval.runner import PER_SAMPLE_FILE, RESULTS_FILE, EvalOptions, compare_runs, load_run, run_eval
from emma.eval.tasks import get_task
from emma.infer.types import GenerationRequest, GenerationResponse

REAL_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa-rad"
needs_real = pytest.mark.skipif(not REAL_VQA_RAD.is_dir(), reason="shared VQA-RAD data not present")
TINY_FAMILY = "llava_onevision"  # the quickest tiny family to run on CPU


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not REAL_VQA_RAD.is_dir():
        pytest.skip("shared VQA-RAD data not present")
    out = tmp_path_factory.mktemp("vqa-rad") / "ds"
    run_importer("vqa-rad", REAL_VQA_RAD, out)
    return out


@pytest.fixture(scope="module")
def test_items(vqa_rad: Path) -> list[Any]:
    from emma.data.store import open_dataset

    return list(get_task("vqa-rad").items(open_dataset(vqa_rad).iter_samples("test")))


@pytest.fixture(scope="module")
def tiny_loaded() -> Any:
    from emma.model.tiny_families import load_tiny

    return load_tiny(TINY_FAMILY)


def write_predictions(path: Path, rows: Sequence[tuple[Any, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for sid, pred in rows:
            f.write(json.dumps({"id": sid, "prediction": pred}) + "\n")
    return path


def score_file(vqa_rad: Path, predictions: Path, out: Path, **kw: Any) -> Any:
    return run_eval(EvalOptions(task="vqa-rad", data=vqa_rad, predictions=predictions, out=out, **kw))


# --------------------------------------------------------------------------------- predictions files


@needs_real
def test_perfect_predictions_score_one_everywhere(
    vqa_rad: Path, test_items: list[Any], tmp_path: Path
) -> None:
    preds = write_predictions(tmp_path / "p.jsonl", [(it.id, it.sample.gold.answer) for it in test_items])
    run = score_file(vqa_rad, preds, tmp_path / "run")
    m = run.results["metrics"]
    assert run.results["n"] == 451
    for name in (
        "closed_accuracy",
        "open_exact_match",
        "open_token_recall",
        "open_token_f1",
        "overall_accuracy",
    ):
        assert m[name] == 1.0, name
        assert run.results["ci95"][name] == [1.0, 1.0]
    assert m["closed_unparseable"] == 0.0
    c = run.results["counts"]
    assert (c["n_closed"], c["n_open"], c["closed_correct"], c["open_exact"]) == (272, 179, 272, 179)


@needs_real
def test_all_no_gives_133_of_272(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    # numeric ids are accepted as their text (VQA-RAD qids)
    rows = [(int(it.id) if it.id.isdigit() else it.id, "No.") for it in test_items]
    run = score_file(vqa_rad, write_predictions(tmp_path / "no.jsonl", rows), tmp_path / "run")
    assert run.results["metrics"]["closed_accuracy"] == 133 / 272
    assert run.results["counts"]["closed_correct"] == 133
    lo, hi = run.results["ci95"]["closed_accuracy"]
    assert lo < 133 / 272 < hi and hi - lo < 0.15
    # the results.json on disk is what was returned, with the contract fields
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("task", "split", "model", "n", "metrics", "ci95", "counts", "config"):
        assert key in on_disk
    cfg = on_disk["config"]
    assert cfg["prompts"]["closed_vqa"].startswith("{question}")
    assert cfg["decoding"]["temperature"] == 0.0
    assert set(cfg["versions"]) == {"emma", "torch", "transformers"}
    assert len(cfg["data_hash"]) == 64 and cfg["compat"] is None and cfg["ablation"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "per_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 451
    first = rows[0]
    for key in ("id", "prompt", "prediction", "extracted", "gold", "correct", "parse_status", "body_part"):
        assert key in first
    breakdown = on_disk["breakdowns"]["body_part"]
    assert sum(g["n"] for g in breakdown.values()) == 451


@needs_real
def test_empty_garbage_and_missing_are_unparseable(
    vqa_rad: Path, test_items: list[Any], tmp_path: Path
) -> None:
    yes_no = [it for it in test_items if it.sample.gold.answer.strip().lower() in ("yes", "no")]
    other_closed = [it for it in test_items if str(it.task_type) == "closed_vqa" and it not in yes_no]
    closed = yes_no  # garbage on a yes/no question is unparseable (on another closed one: a wrong answer)
    rows = [(it.id, "   ") for it in other_closed]
    for k, it in enumerate(closed):
        if k % 3 == 0:
            rows.append((it.id, ""))
        elif k % 3 == 1:
            rows.append((it.id, "%%% ☃ the image is abnormal"))
        # k % 3 == 2: no prediction at all
    path = write_predictions(tmp_path / "bad.jsonl", rows)
    with path.open("a") as f:
        f.write("not json\n")
        f.write(json.dumps({"id": closed[2].id, "prediction": 42}) + "\n")  # not a string: invalid line
        f.write(json.dumps({"id": closed[5].id, "prediction": None}) + "\n")  # null: an empty answer
    run = score_file(vqa_rad, path, tmp_path / "run")
    m, c = run.results["metrics"], run.results["counts"]
    assert m["closed_accuracy"] == 0.0
    assert m["closed_unparseable"] == 1.0 and c["closed_unparseable"] == 272
    assert c["missing_predictions"] == len(test_items) - len(rows) - 1  # one more came from the null line
    assert c["invalid_lines"] == 2
    statuses = {r["id"]: r["parse_status"] for r in run.rows}
    assert statuses[closed[0].id] == "empty"
    assert statuses[closed[1].id] == "unparseable"
    assert statuses[closed[2].id] == "missing"
    assert statuses[closed[5].id] == "empty"
    assert "could not be parsed" in (tmp_path / "run" / "report.md").read_text()


@needs_real
def test_unknown_ids_are_reported(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    rows = [(it.id, "yes") for it in test_items] + [("no-such-id", "yes"), ("0", "yes")]  # qid 0 is train
    run = score_file(vqa_rad, write_predictions(tmp_path / "p.jsonl", rows), tmp_path / "run")
    info = run.results["predictions_file"]
    assert info["unknown_ids"] == 2 and set(info["unknown_id_examples"]) == {"no-such-id", "0"}
    assert run.results["counts"]["unknown_ids"] == 2 and run.results["counts"]["missing_predictions"] == 0
    assert any("not in the evaluated split" in n for n in run.results["notes"])
    assert "no-such-id" in (tmp_path / "run" / "report.md").read_text()


@needs_real
def test_compat_scorer_is_labelled_and_differs(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    rows = [(it.id, "The image is abnormal") for it in test_items]
    preds = write_predictions(tmp_path / "p.jsonl", rows)
    emma_run = score_file(vqa_rad, preds, tmp_path / "emma")
    compat_run = score_file(vqa_rad, preds, tmp_path / "compat", compat="medevalkit")

    def yes_no_hits(run: Any) -> int:
        return sum(bool(r["correct"]) for r in run.rows if str(r["gold"]).strip().lower() in ("yes", "no"))

    assert yes_no_hits(emma_run) == 0  # "abnormal" is not a "no"
    assert yes_no_hits(compat_run) == 133  # the substring bug: a correct "no" on every "no" question
    assert compat_run.results["counts"]["n_closed"] == 251  # compat decides closed by a yes/no gold
    assert compat_run.results["config"]["compat"] == "compat:medevalkit"
    assert "compat:medevalkit" in (tmp_path / "compat" / "report.md").read_text()
    assert "compat:medevalkit" in (tmp_path / "compat" / "report.html").read_text()


@needs_real
def test_compare_two_runs(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    no = write_predictions(tmp_path / "no.jsonl", [(it.id, "no") for it in test_items])
    perfect = write_predictions(tmp_path / "ok.jsonl", [(it.id, it.sample.gold.answer) for it in test_items])
    score_file(vqa_rad, no, tmp_path / "a", n_resamples=500)
    score_file(vqa_rad, perfect, tmp_path / "b", n_resamples=500)
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", n_resamples=500)
    assert cmp["n_shared"] == 451 and cmp["warnings"] == []
    closed = cmp["metrics"]["closed_accuracy"]
    assert closed["n"] == 272
    assert closed["a"] == 133 / 272 and closed["b"] == 1.0
    assert closed["delta"] == pytest.approx(1 - 133 / 272)
    assert 0 < closed["ci95"][0] <= closed["delta"] <= closed["ci95"][1]
    assert closed["p_permutation"] < 0.01
    same = compare_runs(tmp_path / "a", tmp_path / "a", n_resamples=200)
    assert same["metrics"]["overall_accuracy"]["delta"] == 0.0
    assert same["metrics"]["overall_accuracy"]["p_permutation"] == 1.0


@needs_real
def test_contamination_against_the_train_split(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    preds = write_predictions(tmp_path / "p.jsonl", [(it.id, "no") for it in test_items])
    run = score_file(vqa_rad, preds, tmp_path / "run", train_data=vqa_rad)
    c = run.results["contamination"]
    assert c["train_splits"] == ["train"] and c["train_samples"] == 1797
    assert (c["evaluated_images"], c["exact_image_overlap"]) == (203, 202)  # the README's numbers
    assert c["contaminated"] is True
    assert "Contamination check" in (tmp_path / "run" / "report.md").read_text()


def test_prediction_file_reader_reports_problems(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": 1, "prediction": "a"}\n[1]\n{"id": "1", "prediction": "b"}\n\n'
        '{"id": true, "prediction": "x"}\n'
    )
    pf = read_prediction_file(path)
    assert pf.predictions == {"1": "b"} and pf.duplicate_ids == ["1"] and pf.invalid_lines == [2, 5]


# -------------------------------------------------------------------------------- a real tiny model


class CountingEngine:
    """Wraps a real engine: records every batch (ids and images) and can simulate a kill."""

    def __init__(self, inner: Any, fail_on_call: int | None = None) -> None:
        self.inner = inner
        self.fail_on_call = fail_on_call
        self.batches: list[list[str]] = []
        self.images: list[list[Image.Image]] = []

    @property
    def model_name(self) -> str:
        return str(self.inner.model_name)

    @property
    def family(self) -> str | None:
        return self.inner.family  # type: ignore[no-any-return]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        if self.fail_on_call is not None and len(self.batches) + 1 >= self.fail_on_call:
            raise RuntimeError("simulated kill")
        self.batches.append([r.request_id for r in requests])
        self.images.append([im for r in requests for im in r.images])
        return self.inner.generate(requests)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny_engine(tiny_loaded: Any) -> Any:
    from emma.infer.transformers_engine import TransformersEngine

    return TransformersEngine(tiny_loaded, max_batch_size=8)


@needs_real
def test_tiny_model_run_writes_every_output(vqa_rad: Path, tiny_engine: Any, tmp_path: Path) -> None:
    engine = CountingEngine(tiny_engine)
    opts = EvalOptions(
        task="vqa-rad",
        data=vqa_rad,
        model="tiny",
        out=tmp_path / "run",
        limit=8,
        batch_size=4,
        max_new_tokens=6,
        n_resamples=200,
    )
    run = run_eval(opts, engine=engine)
    assert [len(b) for b in engine.batches] == [4, 4]  # the harness batches its requests
    for name in ("results.json", "per_sample.jsonl", "report.md", "report.html", "predictions.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert run.results["n"] == 8 and len(run.rows) == 8
    assert run.results["config"]["decoding"]["max_new_tokens"] == 6
    assert run.results["generation"]["generated"] == 8
    html = (tmp_path / "run" / "report.html").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert "data:image/png;base64," in html  # plots embedded
        assert (tmp_path / "run" / "plot_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in html
    # a rerun into the same folder generates nothing
    again = CountingEngine(tiny_engine)
    rerun = run_eval(opts, engine=again)
    assert again.batches == [] and rerun.results["generation"]["from_cache"] == 8
    assert [r["prediction"] for r in rerun.rows] == [r["prediction"] for r in run.rows]


@needs_real
def test_killed_run_resumes_without_regenerating(vqa_rad: Path, tiny_engine: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    opts = EvalOptions(
        task="vqa-rad",
        data=vqa_rad,
        model="tiny",
        out=out,
        limit=10,
        batch_size=4,
        max_new_tokens=4,
        n_resamples=200,
    )
    killed = CountingEngine(tiny_engine, fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_eval(opts, engine=killed)
    first_batch = [rid.removeprefix("eval-") for rid in killed.batches[0]]
    assert len(first_batch) == 4 and not (out / "results.json").exists()
    cache_lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in cache_lines] == first_batch  # durable as soon as it returned
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"v": 1, "id": "torn')  # a kill in the middle of a write
    resumed = CountingEngine(tiny_engine)
    run = run_eval(opts, engine=resumed)
    regenerated = [rid.removeprefix("eval-") for b in resumed.batches for rid in b]
    assert len(regenerated) == 6 and not set(regenerated) & set(first_batch)
    assert [len(b) for b in resumed.batches] == [4, 2]
    assert (run.results["generation"]["generated"], run.results["generation"]["from_cache"]) == (6, 4)
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == 10 == len(set(ids))  # nothing duplicated, the torn line gone
    assert len(PredictionCache(out / "predictions.jsonl")) == 10


class FixedEngine:
    """An Engine answering "no" to everything, or ``answer(request)`` (ablation plumbing without model cost)."""

    family = None

    def __init__(
        self, answer: Callable[[GenerationRequest], str] | None = None, name: str = "fixed-no"
    ) -> None:
        self.answer = answer or (lambda request: "no")
        self.model_name = name

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        return [
            GenerationResponse(request_id=r.request_id, text=self.answer(r), finish_reason="stop")
            for r in requests
        ]


def _is_black(im: Image.Image) -> bool:
    return im.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))


@needs_real
def test_ablation_blank_changes_the_images(vqa_rad: Path, tmp_path: Path) -> None:
    engine = CountingEngine(FixedEngine())
    opts = EvalOptions(
        task="vqa-rad",
        data=vqa_rad,
        model="fixed",
        out=tmp_path / "run",
        limit=6,
        batch_size=3,
        ablate="blank",
        n_resamples=200,
    )
    run = run_eval(opts, engine=engine)
    assert len(engine.images) == 4  # 2 batches with the real images, then 2 ablated
    real = [im for batch in engine.images[:2] for im in batch]
    blank = [im for batch in engine.images[2:] for im in batch]
    assert len(real) == len(blank) == 6
    assert not any(_is_black(im) for im in real)
    assert all(_is_black(im) for im in blank)
    assert [im.size for im in real] == [im.size for im in blank]
    ablation = run.results["ablation"]
    assert ablation["mode"] == "blank" and run.results["config"]["ablation"] == "blank"
    delta = ablation["delta"]["overall_accuracy"]
    assert delta["delta"] == 0.0 and delta["a"] == delta["b"]  # a text-only "model": no image dependence
    assert "ablated_prediction" in run.rows[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "run" / "plot_ablation.png").is_file()
    assert "Image ablation" in (tmp_path / "run" / "report.md").read_text()
    # a normal run into the same folder reuses the real-image predictions, the ablated ones stay apart
    again = CountingEngine(FixedEngine())
    run_eval(
        EvalOptions(task="vqa-rad", data=vqa_rad, model="fixed", out=tmp_path / "run", limit=6), engine=again
    )
    assert again.batches == []


def _seeing(request: GenerationRequest) -> str:
    """Answers "yes" when shown a real image and "no" for a black one."""
    return "no" if any(_is_black(im) for im in request.images) else "yes"


@needs_real
def test_ablation_keeps_the_real_image_metrics_as_the_headline(vqa_rad: Path, tmp_path: Path) -> None:
    opts = EvalOptions(
        task="vqa-rad",
        data=vqa_rad,
        model="seeing",
        out=tmp_path / "run",
        limit=40,
        ablate="blank",
        n_resamples=200,
    )
    run = run_eval(opts, engine=FixedEngine(_seeing, name="seeing"))
    plain = run_eval(
        EvalOptions(task="vqa-rad", data=vqa_rad, model="seeing", out=tmp_path / "plain", limit=40),
        engine=FixedEngine(_seeing, name="seeing"),
    )
    assert run.results["metrics"] == plain.results["metrics"]  # real images: every answer "yes"
    assert all(row["prediction"] == "yes" and row["ablated_prediction"] == "no" for row in run.rows)
    ablated = run.results["ablation"]["ablated"]["metrics"]["closed_accuracy"]
    delta = run.results["ablation"]["delta"]["closed_accuracy"]
    assert delta["a"] == run.results["metrics"]["closed_accuracy"] and delta["b"] == ablated
    assert ablated != run.results["metrics"]["closed_accuracy"]


@needs_real
def test_ablation_shuffle_shows_another_samples_image(vqa_rad: Path, tmp_path: Path) -> None:
    engine = CountingEngine(FixedEngine())
    opts = EvalOptions(
        task="vqa-rad",
        data=vqa_rad,
        model="fixed",
        out=tmp_path / "run",
        limit=12,
        batch_size=12,
        ablate="shuffle",
        n_resamples=200,
    )
    run_eval(opts, engine=engine)
    real, shuffled = engine.images
    real_bytes = [im.tobytes() for im in real]
    for i, im in enumerate(shuffled):
        assert im.tobytes() != real_bytes[i]  # never the sample's own image
        assert im.tobytes() in real_bytes  # an image of another evaluated sample


def test_shuffle_donors_and_noise_are_seeded() -> None:
    keys = ["a", "a", "b", "c", "c", "d"]
    donors = shuffle_donors(keys, seed=3)
    assert donors == shuffle_donors(keys, seed=3)
    assert all(keys[d] != keys[i] for i, d in enumerate(donors))
    with pytest.raises(InputError):
        shuffle_donors(["x", "x"], seed=0)
    im = Image.new("RGB", (5, 4))
    a, b = noise_like(im, 0, "s1"), noise_like(im, 0, "s1")
    assert a.size == (5, 4) and a.tobytes() == b.tobytes()
    assert noise_like(im, 0, "s2").tobytes() != a.tobytes()
    assert np.asarray(a).std() > 30


@needs_real
def test_run_checks_its_options(vqa_rad: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not both"):
        run_eval(
            EvalOptions(task="vqa-rad", data=vqa_rad, model="x", predictions=tmp_path / "p", out=tmp_path)
        )
    with pytest.raises(InputError, match="needs a model"):
        run_eval(
            EvalOptions(
                task="vqa-rad", data=vqa_rad, predictions=tmp_path / "p", ablate="blank", out=tmp_path
            )
        )
    with pytest.raises(InputError, match="unknown ablation"):
        run_eval(EvalOptions(task="vqa-rad", data=vqa_rad, model="x", ablate="invert", out=tmp_path))


class VerdictEngine:
    """A judge Engine that accepts every answer mentioning the word in its reference, else rejects it."""

    model_name = "judge-stub"
    family = None

    def __init__(self) -> None:
        self.asked = 0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        out = []
        for r in requests:
            self.asked += 1
            text = r.messages[-1].text_content
            reference = text.split("Reference answer: ")[1].split("\n")[0].lower()
            candidate = text.split("Candidate answer: ")[1].split("\n")[0].lower()
            verdict = "CORRECT" if reference.split()[0] in candidate else "INCORRECT"
            out.append(GenerationResponse(request_id=r.request_id, text=verdict, finish_reason="stop"))
        return out


@needs_real
def test_judge_only_adds_judge_metrics(vqa_rad: Path, test_items: list[Any], tmp_path: Path) -> None:
    rows = [(it.id, f"I think: {it.sample.gold.answer}") for it in test_items[:40]]
    preds = write_predictions(tmp_path / "p.jsonl", rows)
    plain = score_file(vqa_rad, preds, tmp_path / "plain", limit=40, n_resamples=200)
    judge = VerdictEngine()
    judged = run_eval(
        EvalOptions(
            task="vqa-rad",
            data=vqa_rad,
            predictions=preds,
            out=tmp_path / "judged",
            limit=40,
            n_resamples=200,
        ),
        judge_engine=judge,
    )
    m = judged.results["metrics"]
    for name, value in plain.results["metrics"].items():
        assert m[name] == value  # rule-based metrics unchanged
    n_open = judged.results["counts"]["n_open"]
    assert judge.asked == n_open > 0  # only open questions go to the judge
    assert m["judge_accuracy"] == 1.0
    assert judged.results["config"]["judge"]["judge_model"] == "judge-stub"
    assert len(judged.results["config"]["judge"]["prompt_hash"]) == 16
    again = VerdictEngine()
    run_eval(
        EvalOptions(
            task="vqa-rad",
            data=vqa_rad,
            predictions=preds,
            out=tmp_path / "judged",
            limit=40,
            n_resamples=200,
        ),
        judge_engine=again,
    )
    assert again.asked == 0  # verdicts cached by (judge model, prompt hash, ...)


class FlakyJudgeEngine(VerdictEngine):
    """The VerdictEngine whose every second request fails (as a judge that drops connections)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
        out = super().generate(requests)
        return [
            GenerationResponse(
                request_id=r.request_id, text="", finish_reason="error", error="connection reset"
            )
            if (self.asked - len(out) + k) % 2 == 1
            else r
            for k, r in enumerate(out)
        ]


@needs_real
def test_a_judge_failing_on_some_answers_gives_null_judge_metrics(
    vqa_rad: Path, test_items: list[Any], tmp_path: Path
) -> None:
    rows = [(it.id, f"I think: {it.sample.gold.answer}") for it in test_items[:40]]
    preds = write_predictions(tmp_path / "p.jsonl", rows)
    options = EvalOptions(
        task="vqa-rad", data=vqa_rad, predictions=preds, out=tmp_path / "j", limit=40, n_resamples=200
    )
    flaky = FlakyJudgeEngine()
    run = run_eval(options, judge_engine=flaky)
    counts, metrics = run.results["counts"], run.results["metrics"]
    assert 0 < counts["judge_errors"] < counts["judge_n"] == counts["n_open"]
    assert metrics["judge_accuracy"] is None and metrics["judge_overall_accuracy"] is None
    assert not run.judged_nothing
    assert any("judge failed on" in n for n in run.results["notes"])
    assert all("judge_accuracy" not in row["values"] for row in run.rows)
    # the failures were not cached: a re-run with a working judge asks for those only and completes
    good = VerdictEngine()
    again = run_eval(options, judge_engine=good)
    assert good.asked == counts["judge_errors"]
    assert again.results["metrics"]["judge_accuracy"] == 1.0


@pytest.mark.parametrize("line", ["{bad", "[1]", "null", '"text"', '{"values": {}}'])
def test_load_run_refuses_a_line_that_is_not_a_per_sample_row(tmp_path: Path, line: str) -> None:
    (tmp_path / RESULTS_FILE).write_text("{}", encoding="utf-8")
    (tmp_path / PER_SAMPLE_FILE).write_text(
        '{"id": "a", "values": {"m": 1}}\n\n' + line + "\n", encoding="utf-8"
    )
    with pytest.raises(DataFormatError, match="line 3 is not a per-sample row"):
        load_run(tmp_path)
