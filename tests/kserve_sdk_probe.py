"""The ``kserve`` SDK's own REST and gRPC clients against ``cxrserve kserve`` (run as a script).

A separate process because the SDK's ``grpc_predict_v2.proto`` and tritonclient's
``grpc_service.proto`` define the same ``inference.*`` messages: protobuf refuses both in
one process ("duplicate symbol 'inference.ServerLiveRequest'"), and the tests use
tritonclient in process. Prints one JSON object for ``test_kserve_native.py``.

    python tests/kserve_sdk_probe.py HTTP_URL GRPC_TARGET MODEL IMAGE BAD_FILE
"""
import asyncio
import json
import sys
from pathlib import Path


async def main(http_url: str, grpc_target: str, model: str, image: bytes, bad: bytes) -> dict:
    import grpc
    import httpx
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    def request(data: bytes, binary: bool, heatmap: bool = False) -> InferRequest:
        inp = InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=object), binary_data=binary)
        return InferRequest(model_name=model, infer_inputs=[inp], request_id="sdk-1",
                            parameters={"heatmap": heatmap} if heatmap else None)

    out: dict = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
    out["rest_live"] = await rest.is_server_live(http_url)
    out["rest_ready"] = await rest.is_server_ready(http_url)
    out["rest_model_ready"] = await rest.is_model_ready(http_url, model)
    res = await rest.infer(http_url, request(image, binary=True), model_name=model)
    out["rest_binary"] = json.loads(res.outputs[0].as_numpy()[0])
    out["rest_id"] = res.id
    try:
        await rest.infer(http_url, request(bad, binary=True), model_name=model)
        out["rest_bad"] = 200
    except httpx.HTTPStatusError as err:
        out["rest_bad"] = err.response.status_code
        out["rest_bad_body"] = err.response.json()
    await rest.close()

    client = InferenceGRPCClient(grpc_target, retries=0, timeout=120)
    out["grpc_live"] = await client.is_server_live()
    out["grpc_ready"] = await client.is_server_ready()
    out["grpc_model_ready"] = await client.is_model_ready(model)
    res = await client.infer(request(image, binary=True, heatmap=True))
    out["grpc"] = json.loads(res.outputs[0].as_numpy()[0])
    try:
        await client.infer(request(bad, binary=True))
        out["grpc_bad"] = "OK"
    except grpc.aio.AioRpcError as err:
        out["grpc_bad"] = err.code().name
        out["grpc_bad_details"] = json.loads(err.details())
        out["grpc_bad_trailers"] = {k: v for k, v in (err.trailing_metadata() or ())}
    await client.close()
    return out


if __name__ == "__main__":
    http_url, grpc_target, model, image, bad = sys.argv[1:6]
    result = asyncio.run(main(http_url, grpc_target, model, Path(image).read_bytes(), Path(bad).read_bytes()))
    print(json.dumps(result))
