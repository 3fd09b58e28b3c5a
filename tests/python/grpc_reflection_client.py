#!/usr/bin/env python3
"""Calls baton's gRPC API the way a generic client does: no generated stubs, only what server
reflection describes.

    python3 tests/python/grpc_reflection_client.py 127.0.0.1:50051

Lists services over grpc.reflection.v1 (falling back to v1alpha), fetches the files that define
baton.v1.Inference, builds message classes from them at run time, and calls the server-streaming
Generate and the unary Tokenize with those classes. Prints one line per check; exits non-zero on
the first failure. Run by cli/tests/clients.rs against a cluster `baton up` started.
"""

import sys

try:
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2
except ImportError as e:
    sys.exit(
        f"missing Python package ({e}); run: "
        "python3 -m pip install -r tests/python/requirements.txt"
    )

from checks import CheckFailed, check, ok  # noqa: E402 (after the dependency check)

INFERENCE = "baton.v1.Inference"
HEALTH = "grpc.health.v1.Health"
# grpc.reflection.v1 and v1alpha declare the same messages with the same field numbers, so the
# v1alpha classes grpcio-reflection ships encode requests for either; only the method path
# differs.
REFLECTION_METHODS = [
    ("v1", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
    ("v1alpha", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
]
TIMEOUT_S = 120
MAX_TOKENS = 8


class Reflection:
    """One reflection method (v1 or v1alpha); each query is its own short stream."""

    def __init__(self, channel):
        self.channel = channel
        self.version = None
        self.call = None
        for version, path in REFLECTION_METHODS:
            call = channel.stream_stream(
                path,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            try:
                self._ask(call, reflection_pb2.ServerReflectionRequest(list_services=""))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                raise
            self.version, self.call = version, call
            return
        raise CheckFailed("the server implements neither grpc.reflection.v1 nor v1alpha")

    @staticmethod
    def _ask(call, request):
        responses = list(call(iter([request]), timeout=TIMEOUT_S))
        check(len(responses) == 1, f"reflection answered {len(responses)} messages, expected 1")
        response = responses[0]
        if response.HasField("error_response"):
            err = response.error_response
            raise CheckFailed(
                f"reflection error {err.error_code}: {err.error_message} (asked {request})"
            )
        return response

    def ask(self, **fields):
        return self._ask(self.call, reflection_pb2.ServerReflectionRequest(**fields))

    def services(self):
        response = self.ask(list_services="")
        return [s.name for s in response.list_services_response.service]

    def files_for_symbol(self, symbol):
        """The file defining `symbol` and, transitively, every file it imports."""
        files = {}

        def take(response):
            for raw in response.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files.setdefault(proto.name, proto)

        take(self.ask(file_containing_symbol=symbol))
        # A server may send only the file itself; fetch imports it left out by name.
        missing = [d for f in list(files.values()) for d in f.dependency if d not in files]
        while missing:
            name = missing.pop()
            if name in files:
                continue
            take(self.ask(file_by_filename=name))
            check(name in files, f"reflection did not return {name}")
            missing.extend(d for d in files[name].dependency if d not in files)
        return files


def build_pool(files):
    """A descriptor pool holding `files`, each added after the files it imports."""
    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add(name):
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in sorted(files):
        add(name)
    return pool


def message_class(pool, full_name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def method(channel, pool, service, name, streaming):
    """A callable for `service/name` using message classes built from `pool`."""
    desc = pool.FindServiceByName(service).FindMethodByName(name)
    request = message_class(pool, desc.input_type.full_name)
    response = message_class(pool, desc.output_type.full_name)
    server_streaming = getattr(desc, "server_streaming", streaming)
    check(
        server_streaming == streaming,
        f"{service}.{name}: server_streaming is {server_streaming}, expected {streaming}",
    )
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(
        f"/{service}/{name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    return request, call


def check_generate(channel, pool):
    request_class, generate = method(channel, pool, INFERENCE, "Generate", streaming=True)
    request = request_class(prompt="The capital of France is", request_id="py-reflection-1")
    request.sampling.max_tokens = MAX_TOKENS
    request.sampling.temperature = 0.0
    responses = list(generate(request, timeout=TIMEOUT_S))
    check(responses, "Generate streamed no messages")
    last = responses[-1]
    check(last.HasField("finish"), f"Generate's last message has no finish: {last}")
    for r in responses[:-1]:
        check(not r.HasField("finish"), f"a Generate message before the last has a finish: {r}")
    usage = last.finish.usage
    check(
        0 < usage.completion_tokens <= MAX_TOKENS,
        f"Generate usage.completion_tokens = {usage.completion_tokens}, expected 1..={MAX_TOKENS}",
    )
    check(usage.prompt_tokens > 0, f"Generate usage.prompt_tokens = {usage.prompt_tokens}")
    token_ids = [t for r in responses for t in r.token_ids]
    check(
        len(token_ids) == usage.completion_tokens,
        f"Generate streamed {len(token_ids)} token ids but usage says {usage.completion_tokens}",
    )
    reasons = pool.FindEnumTypeByName("baton.v1.FinishReason").values_by_number
    reason = reasons[last.finish.reason].name
    check(
        reason in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"),
        f"Generate finished with {reason}",
    )
    request_ids = {r.request_id for r in responses}
    check(
        request_ids == {request.request_id},
        f"Generate messages carry request ids {request_ids}, expected {request.request_id!r}",
    )
    text = "".join(r.text for r in responses)
    check(text, "Generate streamed no text")
    ok(
        f"Generate -> {text!r} in {len(responses)} messages, {reason}, "
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
    )


def check_tokenize(channel, pool):
    request_class, tokenize = method(channel, pool, INFERENCE, "Tokenize", streaming=False)
    response = tokenize(request_class(prompt="The capital of France is"), timeout=TIMEOUT_S)
    check(response.token_ids, f"Tokenize returned no tokens: {response}")
    check(
        response.count == len(response.token_ids),
        f"Tokenize count {response.count} != {len(response.token_ids)} token ids",
    )
    check(
        response.max_context > response.count,
        f"Tokenize max_context = {response.max_context}",
    )
    ok(
        f"Tokenize -> {response.count} tokens {list(response.token_ids)}, "
        f"max_context {response.max_context}"
    )


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT  (e.g. 127.0.0.1:50051)")
    addr = sys.argv[1]
    try:
        with grpc.insecure_channel(addr) as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
            reflection = Reflection(channel)
            services = reflection.services()
            for wanted in (INFERENCE, HEALTH):
                check(wanted in services, f"reflection lists {services}, missing {wanted}")
            ok(f"reflection {reflection.version} lists {services}")

            files = reflection.files_for_symbol(INFERENCE)
            pool = build_pool(files)
            methods = [m.name for m in pool.FindServiceByName(INFERENCE).methods]
            check("Generate" in methods and "Tokenize" in methods, f"{INFERENCE} has {methods}")
            ok(f"descriptors of {INFERENCE} from {sorted(files)}: methods {methods}")

            check_generate(channel, pool)
            check_tokenize(channel, pool)
    except CheckFailed as e:
        sys.exit(f"FAILED: {e}")
    except grpc.RpcError as e:
        sys.exit(f"FAILED: gRPC error {e.code()}: {e.details()}")
    print(f"grpcio {grpc.__version__}: all checks passed against {addr}")


if __name__ == "__main__":
    main()
