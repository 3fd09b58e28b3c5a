"""What the client scripts share: a failed check, and the line each passed check prints."""


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def ok(message):
    print(f"ok: {message}", flush=True)
