"""Serving on Triton: `build --target triton` on the embedded model's threshold export, the real bundled
tritonserver started on free loopback ports, and its answers compared with `shadowllm generate` on the
same export (generate, generate_stream, 8 concurrent clients, bad requests)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.serving.client import free_ports, post

PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time", "The largest planet is",
           "To bake bread, first", "In 1969, astronauts", "Photosynthesis turns", "A prime number is"]


def cli_generate(folder, prompt: str, max_tokens: int) -> str:
    run = subprocess.run([sys.executable, "-m", "shadowllm", "generate", str(folder), "--prompt", prompt,
                          "--max-new-tokens", str(max_tokens)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout[:-1] if run.stdout.endswith("\n") else run.stdout  # the CLI ends the text with a newline


@pytest.fixture(scope="module")
def server(default_export):
    from shadowllm.compiler.build import build
    from shadowllm.serving.server import TritonServer

    folder = default_export("threshold")  # the policy to deploy; requests without a sparsity run row 0.00
    repository = build(folder, "triton", max_batch=8)
    http, grpc = free_ports(2)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=None) as running:
        yield folder, running


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2-threshold-export")  # shares the export with tests/parity/test_default_exports.py
def test_generate_and_generate_stream_match_the_cli(server):
    folder, running = server
    expect = cli_generate(folder, PROMPTS[0], 16)
    status, body = post(f"{running.http_url}/v2/models/shadowllm/generate", {"text_input": PROMPTS[0], "max_tokens": 16})
    assert status == 200 and body["text_output"] == expect and body["finish_reason"] == "length"
    status, events = post(f"{running.http_url}/v2/models/shadowllm/generate_stream",
                          {"text_input": PROMPTS[0], "max_tokens": 16, "stream": True})
    assert status == 200 and len(events) > 2  # one event per text delta, then the final one
    assert "".join(e["text_output"] for e in events) == expect and events[-1]["finish_reason"] == "length"


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2-threshold-export")  # shares the export with tests/parity/test_default_exports.py
def test_concurrent_clients_each_get_their_own_answer(server):
    """8 clients at once (the dynamic batcher puts them in shared batches), different prompts and
    lengths: every answer is the one that prompt gets alone."""
    folder, running = server
    from shadowllm.runtime.generate import generate
    from shadowllm.runtime.ort_backend import OrtBackend
    from transformers import AutoTokenizer

    backend, tokenizer = OrtBackend(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    lengths = [6 + 2 * i for i in range(len(PROMPTS))]
    expect = [generate(backend, tokenizer, p, n)[0].text for p, n in zip(PROMPTS, lengths)]
    answers = [None] * len(PROMPTS)

    def client(i):
        answers[i] = post(f"{running.http_url}/v2/models/shadowllm/generate",
                          {"text_input": PROMPTS[i], "max_tokens": lengths[i]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a[0] for a in answers] == [200] * len(PROMPTS)
    assert [a[1]["text_output"] for a in answers] == expect


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2-threshold-export")
@pytest.mark.parametrize("body, words", [({"text_input": ""}, "text_input"),
                                         ({"text_input": "hi", "sparsity": 1.5}, "sparsity must lie in [0, 1)"),
                                         ({"text_input": "hi", "max_tokens": 0}, "max_tokens must lie in [1,"),
                                         ({"text_input": "hi", "temperature": -1}, "temperature")])
def test_a_bad_request_gets_an_error_and_the_server_stays_up(server, body, words):
    _, running = server
    status, answer = post(f"{running.http_url}/v2/models/shadowllm/generate", body)
    assert status == 400 and words in answer["error"]
    status, answer = post(f"{running.http_url}/v2/models/shadowllm/generate", {"text_input": "Hello", "max_tokens": 2})
    assert status == 200 and answer["text_output"] and running.alive()


def test_the_repository_config_is_tritons_own_message(tmp_path):
    """config.pbtxt parses back into Triton's ModelConfig with the generate extension's names, a
    decoupled Python model, dynamic batching and the asked instances; bad flags are one line."""
    from shadowllm.compiler.build import build
    from shadowllm.compiler.triton import read_config
    from shadowllm.export.exporter import export

    folder = export(build_model("llama", seed=2), byte_tokenizer(), tmp_path / "e")
    repository = build(folder, "triton", instances=2, max_batch=4, sparsity=0.25)
    config = read_config(repository / "shadowllm" / "config.pbtxt")
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert config.max_batch_size == 4 and config.instance_group[0].count == 2
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [i.name for i in config.input] == ["text_input", "max_tokens", "temperature", "top_p", "seed", "stream",
                                              "sparsity"]
    assert [i.optional for i in config.input] == [False] + [True] * 6
    assert [o.name for o in config.output] == ["text_output", "finish_reason"]
    assert config.parameters["export"].string_value == "../.." and config.parameters["sparsity"].string_value == "0.25"
    assert (repository / "shadowllm" / "1" / "model.py").read_text().count("TritonPythonModel")
    for flags, words in (({"instances": 0}, "--instances"), ({"max_batch": 100}, "--max-batch"),
                         ({"sparsity": 1.0}, "--sparsity")):
        with pytest.raises(ShadowError, match=words):
            build(folder, "triton", **flags)


def test_the_service_batches_rows_with_their_own_limits(tmp_path):
    """In process (no server): requests of one batch keep their own max_tokens, finish on their own,
    and give what each gets alone; a bad field is one line naming it."""
    from shadowllm.export.exporter import export
    from shadowllm.runtime.generate import generate
    from shadowllm.serving.service import GenerationService, parse_request

    model = build_model("opt", seed=5)
    folder = export(model, byte_tokenizer(), tmp_path / "e")
    service = GenerationService(folder)
    prompts = ["abc", "hello there", "z"]
    requests = [parse_request({"text_input": p, "max_tokens": n}, 0.0, service.max_positions)
                for p, n in zip(prompts, (3, 7, 5))]
    texts, done = {}, []
    service.run(requests, lambda i, d: texts.__setitem__(i, texts.get(i, "") + d),
                lambda i, c, e: done.append((i, c, e)))
    assert sorted(i for i, _, _ in done) == [0, 1, 2] and all(e is None for _, _, e in done)
    for i, completion, _ in done:
        alone = generate(service.backend, service.tokenizer, prompts[i], requests[i].max_tokens)[0]
        assert completion.token_ids == alone.token_ids and texts.get(i, "") == completion.text
        assert len(completion.token_ids) <= requests[i].max_tokens
    for fields, words in (({"text_input": "x", "top_p": 0}, "top_p"), ({"text_input": "x", "max_tokens": "many"},
                                                                       "max_tokens"),
                          ({"max_tokens": 3}, "text_input"), ({"text_input": "x", "temperature": float("nan")},
                                                              "temperature")):
        with pytest.raises(ShadowError, match=words):
            parse_request(fields, 0.0, service.max_positions)


def test_serve_without_the_bundled_server_says_how_to_install_it(tmp_path, monkeypatch):
    from shadowllm.compiler.build import build
    from shadowllm.export.exporter import export

    folder = export(build_model("opt", seed=6), byte_tokenizer(), tmp_path / "e")
    repository = build(folder, "triton")
    run = subprocess.run([sys.executable, "-m", "shadowllm", "serve", str(repository)], capture_output=True, text=True,
                         env={**__import__("os").environ, "SHADOWLLM_TRITON_ENV": str(tmp_path / "nowhere")})
    assert run.returncode != 0 and "scripts/setup.sh installs it" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "shadowllm", "serve", str(folder)], capture_output=True, text=True)
    assert run.returncode != 0 and "not a model repository" in run.stderr


class FakeStepServer:
    """The parts of Triton's triton_python_backend_utils that TritonStepBackend uses, answered by an
    onnxruntime session made as Triton's onnxruntime backend would make it from the step model's
    config.pbtxt (its model file, its op library) — and checking each request against that config
    (names, data types, ranks and fixed dims, [1] -> [] reshapes), which the bundled server cannot do:
    it has no onnxruntime backend."""

    TYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_BOOL": "bool"}

    def __init__(self, repository):
        import onnxruntime as ort

        from shadowllm.compiler.triton import STEP_MODEL, model_config_pb2, read_config

        self.config = read_config(repository / STEP_MODEL / "config.pbtxt")
        pb = model_config_pb2()
        self.kinds = {i.name: (self.TYPES[pb.DataType.Name(i.data_type)], list(i.dims), i.HasField("reshape"))
                      for i in self.config.input}
        options = ort.SessionOptions()
        options.register_custom_ops_library(self.config.model_operations.op_library_filename[0])
        model = repository / STEP_MODEL / "1" / self.config.default_model_filename
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.calls = 0
        fake = self

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, array

            def as_numpy(self):
                return self.array

        class Response:
            def __init__(self, outputs):
                self.outputs = outputs

            def has_error(self):
                return False

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                assert model_name == fake.config.name
                self.outputs, self.inputs = requested_output_names, inputs

            def exec(self):
                feeds = {}
                for t in self.inputs:
                    dtype, dims, reshaped = fake.kinds[t.name]
                    assert str(t.array.dtype) == dtype and t.array.ndim == len(dims), t.name
                    assert all(d in (-1, n) for d, n in zip(dims, t.array.shape)), (t.name, dims, t.array.shape)
                    feeds[t.name] = t.array.reshape(()) if reshaped else t.array
                fake.calls += 1
                return Response(dict(zip(self.outputs, fake.session.run(self.outputs, feeds))))

        self.Tensor, self.InferenceRequest = Tensor, InferenceRequest

    @staticmethod
    def get_output_tensor_by_name(response, name):
        class Out:
            def as_numpy(self):
                return response.outputs[name]
        return Out()


def test_the_onnxruntime_step_model_drives_generation_like_the_export(tmp_path):
    """--step onnxruntime: the step model's config names every graph input and output with its type
    and dims, loads the custom-op library, links the export's files; the Python model's step backend
    over it generates what OrtBackend generates on the export."""
    import onnx

    from shadowllm.compiler.build import build
    from shadowllm.compiler.triton import STEP_MODEL, read_config
    from shadowllm.export.exporter import export
    from shadowllm.runtime.generate import generate
    from shadowllm.runtime.ort_backend import OrtBackend
    from shadowllm.serving.triton_model import TritonStepBackend

    folder = export(build_model("llama", seed=7), byte_tokenizer(), tmp_path / "e")
    repository = build(folder, "triton", step="onnxruntime")
    config = read_config(repository / "shadowllm" / "config.pbtxt")
    assert config.parameters["runtime"].string_value == "triton-step"
    assert config.parameters["step_model"].string_value == STEP_MODEL
    step = read_config(repository / STEP_MODEL / "config.pbtxt")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert step.backend == "onnxruntime" and step.max_batch_size == 0
    assert [i.name for i in step.input] == [i.name for i in graph.input]
    assert [o.name for o in step.output] == [o.name for o in graph.output]
    assert [i.name for i in step.input if i.optional] == ["logits_to_keep"]
    assert (repository / STEP_MODEL / "1" / "model.onnx").resolve() == (folder / "model.onnx").resolve()

    fake = FakeStepServer(repository)
    stepped = TritonStepBackend(folder, STEP_MODEL, fake)
    tokenizer = byte_tokenizer()
    prompts = ["hello", "a longer prompt"]
    ours = generate(stepped, tokenizer, prompts, 12)
    expect = generate(OrtBackend(folder), tokenizer, prompts, 12)
    assert [o.token_ids for o in ours] == [e.token_ids for e in expect] and fake.calls >= 12
    with pytest.raises(ShadowError, match="--op-library applies"):
        build(folder, "triton", op_library="/x.so")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_serve_prints_its_endpoints_and_stops_on_ctrl_c(tmp_path, stop):
    """`shadowllm serve` as a user runs it: ready, endpoints printed, Ctrl-C (SIGINT) or SIGTERM (docker
    stop, systemd) stops the server and exits 0, leaving no tritonserver behind — also when it was
    started with SIGINT ignored, as a non-interactive shell starts background jobs (CI's runner did,
    and the server never stopped)."""
    import signal
    import time

    from shadowllm.compiler.build import build
    from shadowllm.export.exporter import export

    folder = export(build_model("llama", seed=8), byte_tokenizer(), tmp_path / "e")
    repository = build(folder, "triton")
    http, grpc, metrics = free_ports(3)

    def left_behind() -> list[int]:  # tritonserver processes listening on this test's port
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"tritonserver") for a in args[:1]) and str(http).encode() in args:
                found.append(int(cmdline.parent.name))
        return found

    serve = subprocess.Popen([sys.executable, "-m", "shadowllm", "serve", str(repository), "--http-port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("Ctrl-C")):
            line = serve.stdout.readline()
            assert line, serve.stderr.read()[-2000:]
            lines.append(line.strip())
        assert any(f"127.0.0.1:{http}" in line for line in lines), lines
        status, answer = post(f"http://127.0.0.1:{http}/v2/models/shadowllm/generate", {"text_input": "ab", "max_tokens": 3})
        assert status == 200 and "text_output" in answer
        serve.send_signal(getattr(signal, stop))
        assert serve.wait(60) == 0
    except BaseException:  # the server runs in a session of its own: do not leave it behind for the next tests
        serve.kill()
        for pid in left_behind():
            os.kill(pid, signal.SIGKILL)
        raise
    assert not left_behind()


@pytest.mark.slow
def test_serve_says_why_the_model_did_not_load(tmp_path):
    """A repository moved away from its export: the server cannot load the model; `serve` exits
    non-zero with Triton's reason in one line (not a screen of server log)."""
    import shutil

    from shadowllm.compiler.build import build
    from shadowllm.export.exporter import export

    folder = export(build_model("opt", seed=10), byte_tokenizer(), tmp_path / "e")
    repository = build(folder, "triton")
    moved = shutil.move(str(repository), str(tmp_path / "elsewhere"))
    http, grpc = free_ports(2)
    run = subprocess.run([sys.executable, "-m", "shadowllm", "serve", moved, "--http-port", str(http), "--grpc-port",
                          str(grpc), "--metrics-port", str(free_ports(1)[0])], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    error = [line for line in run.stderr.splitlines() if line.startswith("shadowllm: error:")]
    assert len(error) == 1 and "partial export folder" in error[0], run.stderr[-2000:]
