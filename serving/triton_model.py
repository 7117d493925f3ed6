"""The `shadowllm` model of a Triton model repository (`shadowllm build DIR --target triton`).

Triton's Python backend loads DIR/triton/shadowllm/1/model.py, which is this class. The model is
decoupled: a request with `stream` true gets one response per text delta and a final one carrying
`finish_reason`; any other request gets exactly one response (what `/generate` needs). Requests that
the dynamic batcher hands over together run as left-padded batches (serving/service.py); a bad
request gets a Triton error response of one line naming the field, and the others go on.

Parameters (config.pbtxt): `export` — the export folder, relative to this model's directory
(`../..`: the folder the repository was built in); `runtime` — ort | tensorrt | triton-step;
`sparsity` — the default for requests that give none; `step_model` (runtime triton-step) — the model
that runs one forward step: the export on Triton's own onnxruntime backend with the custom-op library
(`build --target triton --step onnxruntime`, for the NGC container), called through Triton's
business-logic scripting (BLS) once per step, the KV cache travelling with each call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shadowllm.compiler.triton import INPUTS, OUTPUTS
from shadowllm.runtime.step_backend import StepBackend



class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from .service import GenerationService

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = (Path(args["model_repository"]) / params.get("export", "../..")).resolve()
        self.default_sparsity = float(params.get("sparsity", "0"))
        runtime = params.get("runtime", "ort")
        backend = TritonStepBackend(folder, params["step_model"], pb_utils) if runtime == "triton-step" else None
        self.service = GenerationService(folder, runtime, backend=backend)

    def execute(self, requests):
        from shadowllm.models import ShadowError

        from .service import parse_request

        senders, parsed = [], []
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed.append(parse_request(self._fields(request), self.default_sparsity, self.service.max_positions))
                senders.append(sender)
            except ShadowError as e:
                self._fail(sender, str(e))

        def on_text(i, delta):
            if parsed[i].stream:
                senders[i].send(self._response(text_output=delta))

        def on_done(i, completion, error):
            if error is not None:
                return self._fail(senders[i], error)
            final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            text = "" if parsed[i].stream else completion.text  # streamed rows have sent their text
            senders[i].send(self._response(text_output=text, finish_reason=completion.finish_reason), flags=final)

        if parsed:
            self.service.run(parsed, on_text, on_done)
        return None  # decoupled: every answer went through a response sender

    def _fields(self, request) -> dict:
        fields = {}
        for name in INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                value = tensor.as_numpy().reshape(-1)
                if value.size != 1:
                    from shadowllm.models import ShadowError

                    raise ShadowError(f"{name}: expected one value per request, got {value.size}")
                fields[name] = value[0].item() if value.dtype != object else value[0]
        return fields

    def _response(self, **outputs):
        return self.pb.InferenceResponse(output_tensors=[
            self.pb.Tensor(name, np.array([[value.encode("utf-8")]], dtype=object)) for name, value in outputs.items()])

    def _fail(self, sender, message: str):
        sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(message)),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonStepBackend(StepBackend):
    """The Backend of runtime/backend.py over a Triton model that runs one step of the export (the
    onnxruntime backend with the custom-op library): each forward is one BLS request with the
    export's inputs (scalars as [1], reshaped by the step model's config) and outputs."""

    name = "triton-step"

    def __init__(self, folder: Path, step_model: str, pb_utils):
        from shadowllm.export.folder import check_export_folder, sparsity_value

        self._arch(check_export_folder(Path(folder)))
        self.step_model, self.pb = step_model, pb_utils
        self.sparsity = sparsity_value(self.manifest, 0.0)

    def _run(self, feeds: dict, last_only: bool) -> dict:
        from shadowllm.models import ShadowError

        feeds = {**feeds, "sparsity": np.asarray(feeds["sparsity"]).reshape(1),
                 "logits_to_keep": np.array([1 if last_only else 0], np.int64)}
        request = self.pb.InferenceRequest(model_name=self.step_model, requested_output_names=self.outputs,
                                           inputs=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise ShadowError(f"step model {self.step_model}: {response.error().message()}")
        return {name: self.pb.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}
