"""Google's own SDK (google-genai) against the Pacer simulator.

Run by simulator/tests/sdk_against_simulator.rs with the simulator's URL as the first
argument. The simulator is started with `gemini-3-pro-image:rpm=1`, any key accepted (for
project sim-project), and project vertex-proj served on its Vertex AI routes.
If the SDK cannot talk to the simulator, the simulator is wrong.
"""

import struct
import sys
import zlib

from google import genai
from google.genai import errors, types

FLASH = "gemini-3.1-flash-image"
PRO = "gemini-3-pro-image"


def png_size(data: bytes) -> tuple[int, int]:
    """Decodes the PNG fully (chunks, CRCs, zlib stream) and returns (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2), "expected 8-bit RGB"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + width * 3), "pixel data does not match IHDR"
    return width, height


def image_parts(response):
    return [
        p.inline_data
        for c in response.candidates
        for p in c.content.parts
        if p.inline_data is not None
    ]


def main(base_url: str) -> None:
    client = genai.Client(
        api_key="sdk-test-key", http_options=types.HttpOptions(base_url=base_url)
    )

    # An image, decoded.
    response = client.models.generate_content(
        model=FLASH,
        contents="a lighthouse at dusk",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K"),
        ),
    )
    blobs = image_parts(response)
    assert len(blobs) == 1, response
    assert blobs[0].mime_type == "image/png"
    assert png_size(blobs[0].data) == (64, 36)
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    image_tokens = [
        d.token_count
        for d in usage.candidates_tokens_details
        if d.modality == types.MediaModality.IMAGE
    ]
    assert image_tokens == [1680], usage
    assert response.model_version == FLASH
    assert response.response_id

    # Different prompts, different pictures.
    other = client.models.generate_content(
        model=FLASH,
        contents="a harbour at dawn",
        config=types.GenerateContentConfig(
            response_modalities=["TEXT", "IMAGE"],
            image_config=types.ImageConfig(aspect_ratio="9:16"),
        ),
    )
    other_blob = image_parts(other)[0]
    assert png_size(other_blob.data) == (36, 64)
    assert other.text, "TEXT modality gives a caption"
    assert other_blob.data != blobs[0].data

    # Streaming (SSE).
    chunks = list(
        client.models.generate_content_stream(
            model=FLASH,
            contents="a lighthouse",
            config=types.GenerateContentConfig(response_modalities=["IMAGE"]),
        )
    )
    assert sum(len(image_parts(c)) for c in chunks) == 1

    # The 429: ClientError with code 429, details holding QuotaFailure and RetryInfo.
    config = types.GenerateContentConfig(response_modalities=["IMAGE"])
    client.models.generate_content(model=PRO, contents="first", config=config)
    try:
        client.models.generate_content(model=PRO, contents="second", config=config)
        raise AssertionError("expected a 429")
    except errors.ClientError as e:
        assert e.code == 429, e
        assert e.status == "RESOURCE_EXHAUSTED", e
        details = e.details["error"]["details"]
        by_type = {d["@type"].rsplit("/", 1)[-1]: d for d in details}
        assert set(by_type) == {
            "google.rpc.Help",
            "google.rpc.QuotaFailure",
            "google.rpc.RetryInfo",
        }, details
        violation = by_type["google.rpc.QuotaFailure"]["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel"
        assert violation["quotaDimensions"]["model"] == PRO
        assert violation["quotaValue"] == "1"
        assert by_type["google.rpc.RetryInfo"]["retryDelay"].endswith("s")
        assert "Please retry in" in e.message

    # A retired model: ClientError 404.
    try:
        client.models.generate_content(
            model="gemini-2.5-flash-image", contents="x", config=config
        )
        raise AssertionError("expected a 404")
    except errors.ClientError as e:
        assert e.code == 404, e

    # An unknown option value: ClientError 400 INVALID_ARGUMENT.
    try:
        client.models.generate_content(
            model=FLASH,
            contents="x",
            config=types.GenerateContentConfig(
                response_modalities=["IMAGE"],
                image_config=types.ImageConfig(aspect_ratio="7:3"),
            ),
        )
        raise AssertionError("expected a 400")
    except errors.ClientError as e:
        assert e.code == 400 and e.status == "INVALID_ARGUMENT", e

    # Image sizes as Google takes them: "512" on 3.1 flash only; "0.5K" is refused.
    half = client.models.generate_content(
        model=FLASH,
        contents="a small lighthouse",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(image_size="512"),
        ),
    )
    assert [
        d.token_count
        for d in half.usage_metadata.candidates_tokens_details
        if d.modality == types.MediaModality.IMAGE
    ] == [747], half.usage_metadata
    for model, size in [(FLASH, "0.5K"), (PRO, "512")]:
        try:
            client.models.generate_content(
                model=model,
                contents="x",
                config=types.GenerateContentConfig(
                    response_modalities=["IMAGE"],
                    image_config=types.ImageConfig(image_size=size),
                ),
            )
            raise AssertionError(f"expected a 400 for {size} on {model}")
        except errors.ClientError as e:
            assert e.code == 400 and e.status == "INVALID_ARGUMENT", e
            assert "image_size" in e.message, e

    # The flex tier, as the SDK sends it (serviceTier in the request body).
    flex = client.models.generate_content(
        model=FLASH,
        contents="a lighthouse, no hurry",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"], service_tier="flex"
        ),
    )
    assert len(image_parts(flex)) == 1, flex

    check_vertex(base_url)
    print("google-genai SDK: all checks passed")


def check_vertex(base_url: str) -> None:
    """The Vertex AI routes, with a service account's OAuth token from the simulator's
    token endpoint, fetched and signed by Google's own auth library."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    creds = service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": "vertex-proj",
            "private_key_id": "sdk-key",
            "private_key": pem,
            "client_email": "sdk@vertex-proj.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": f"{base_url}/token",
        },
        scopes=["https://www.googleapis.com/auth/cloud-platform"],
    )
    vertex = genai.Client(
        vertexai=True,
        project="vertex-proj",
        location="us-central1",
        credentials=creds,
        http_options=types.HttpOptions(base_url=base_url),
    )
    response = vertex.models.generate_content(
        model=PRO,
        contents="a lighthouse at dusk",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio="1:1", image_size="1K"),
        ),
    )
    (blob,) = image_parts(response)
    assert png_size(blob.data)[0] == png_size(blob.data)[1], "1:1 expected"
    assert creds.token and creds.token.startswith("ya29."), creds.token
    # Vertex's shared quota: a bare 429 naming no quota (rpm=1 on this project too).
    try:
        vertex.models.generate_content(model=PRO, contents="again")
        raise AssertionError("expected a 429 on Vertex")
    except errors.ClientError as e:
        assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED", e
        assert not (e.details or {}).get("error", {}).get("details"), e.details
    # A token the endpoint never issued.
    stranger = genai.Client(
        vertexai=True,
        project="vertex-proj",
        location="us-central1",
        credentials=user_credentials.Credentials(token="ya29.forged"),
        http_options=types.HttpOptions(base_url=base_url),
    )
    try:
        stranger.models.generate_content(model=FLASH, contents="x")
        raise AssertionError("expected a 401 for a forged token")
    except errors.ClientError as e:
        assert e.code == 401 and e.status == "UNAUTHENTICATED", e


if __name__ == "__main__":
    main(sys.argv[1])
