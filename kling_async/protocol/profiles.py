"""Backend profiles: the limits and abilities that differ between CometAPI and Kling's own API.

The public sources disagree on limits (CometAPI documents a 500-character prompt and seven
aspect ratios; Kling documents 2500 and three), so each backend gets a profile and the request
is checked against it before the first network call: a clear local error beats a round trip
that ends in code 1201.
"""

from __future__ import annotations

import warnings
from typing import Literal

import attrs

from kling_async._errors import UnknownModelWarning, ValidationError
from kling_async.protocol.models import Text2VideoRequest

__all__ = [
    "COMETAPI",
    "KNOWN_MODELS",
    "OFFICIAL",
    "BackendProfile",
    "ExternalIdLookup",
    "RepeatedExternalId",
    "UnknownModelWarning",
]

#: Text-to-video models known when this SDK was released. Others are sent with a warning:
#: new models appear often, and a hard reject would lock users out of them.
KNOWN_MODELS = (
    "kling-v1",
    "kling-v1-6",
    "kling-v2-master",
    "kling-v2-1-master",
    "kling-v2-5-turbo",
    "kling-v2-6",
    "kling-v3",
)

#: How a task is looked up by ``external_task_id`` (protocol 1.1: clients disagree):
#: ``"query"`` ``GET .../text2video?external_task_id=X``; ``"path"`` ``GET .../text2video/X``;
#: ``"path_flag"`` ``GET .../text2video/X?external_task_id=true``.
ExternalIdLookup = Literal["query", "path", "path_flag"]

#: What a backend does with a repeated ``external_task_id`` (protocol 7 calls it unverified):
#: refuse it, answer with the first task, or accept it and create another.
RepeatedExternalId = Literal["reject", "return_first", "accept"]

_CLASSIC_DURATIONS = ("5", "10")
_V3_DURATIONS = tuple(str(n) for n in range(3, 16))


@attrs.frozen(kw_only=True)
class BackendProfile:
    """What one backend accepts and offers.

    ``supports_list`` says whether the list endpoint exists (undocumented on CometAPI), and
    ``external_id_lookup`` how to query by ``external_task_id`` (None where the backend cannot:
    an ambiguous create then raises :class:`AmbiguousSubmissionError` instead of guessing);
    the client checks at run time which form works, on a task it knows exists.
    ``repeated_external_id`` says what the backend does with a repeated ``external_task_id``
    (None: unknown, so a create re-sent after an unsettled outcome marks its job
    ``possible_duplicate``; a refusal seen at run time teaches "reject").
    """

    name: str
    prompt_max: int
    negative_prompt_max: int
    aspect_ratios: tuple[str, ...]
    supports_list: bool
    external_id_lookup: ExternalIdLookup | None = "query"
    repeated_external_id: RepeatedExternalId | None = None

    def validate(self, request: Text2VideoRequest) -> None:
        """Raise :class:`ValidationError` for the first rule of this backend the request breaks."""
        if len(request.prompt) > self.prompt_max:
            raise ValidationError(
                "prompt",
                request.prompt,
                f"is {len(request.prompt)} characters; "
                f"{self.name} allows at most {self.prompt_max}",
            )
        negative = request.negative_prompt
        if negative is not None and len(negative) > self.negative_prompt_max:
            raise ValidationError(
                "negative_prompt",
                negative,
                f"is {len(negative)} characters; "
                f"{self.name} allows at most {self.negative_prompt_max}",
            )
        if request.aspect_ratio is not None and request.aspect_ratio not in self.aspect_ratios:
            raise ValidationError(
                "aspect_ratio",
                request.aspect_ratio,
                f"{self.name} accepts {', '.join(self.aspect_ratios)}",
            )
        model = request.effective_model
        if model not in KNOWN_MODELS:
            warnings.warn(
                f"model_name={model!r} is not a text-to-video model this SDK knows "
                f"({', '.join(KNOWN_MODELS)}); sending it anyway",
                UnknownModelWarning,
                stacklevel=3,
            )
        if request.duration is not None:
            allowed = self.durations_for(model)
            if allowed is not None and request.duration not in allowed:
                raise ValidationError(
                    "duration",
                    request.duration,
                    f"{model} accepts {', '.join(allowed)} seconds",
                )

    @staticmethod
    def durations_for(model: str) -> tuple[str, ...] | None:
        """Clip lengths a model accepts, or None for a model we do not know (no local check)."""
        if model == "kling-v3":
            return _V3_DURATIONS
        if model in KNOWN_MODELS:
            return _CLASSIC_DURATIONS
        return None


#: The CometAPI gateway's rules (what its docs say): prompts up to 500 characters, negative
#: prompts up to 200, seven aspect ratios, no list endpoint. The profile of ``api_key=``.
COMETAPI = BackendProfile(
    name="cometapi",
    prompt_max=500,
    negative_prompt_max=200,
    aspect_ratios=("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3"),
    supports_list=False,
)

#: Kling's official API: prompts and negative prompts up to 2500 characters, three aspect
#: ratios, the list endpoint. The profile of ``access_key=`` + ``secret_key=``.
OFFICIAL = BackendProfile(
    name="official",
    prompt_max=2500,
    negative_prompt_max=2500,
    aspect_ratios=("16:9", "9:16", "1:1"),
    supports_list=True,
)
