"""vlm_node's requests over several images: surround view (the latest frame of several cameras) and history
(N frames of one camera over the last S seconds). No rclpy node here: the node passes its camera feeds,
its clock-based checks and the engine.

A request is checked when it arrives (`image_set_request`: names, counts, cameras without any frame) and
its frames are taken, checked for age and decoded by the worker when the job runs (`run_image_set`), as
for a single image. Every camera whose frame is missing, stale or malformed is named in the refusal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from zip_vlm_ros.node.conversions import ImageConversionError, output_to_result, stamp_to_seconds
from zip_vlm_ros.node.frame_history import HistoryUnavailable, history_label, pick_history
from zip_vlm_ros.node.jobs import CameraFeed, Frame, Job, RequestRejected
from zip_vlm_ros.node.overlays import image_set_views
from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.engine.multi_image import ImageInput

__all__ = ['HISTORY_UNAVAILABLE', 'ImageSetRequest', 'SelectedImage', 'image_set_request', 'resolve_total_budget',
           'run_image_set']

# In the refusal of a history its camera's buffer cannot give (a client may wait for frames and ask again).
HISTORY_UNAVAILABLE = 'has no history of'


@dataclass(frozen=True)
class ImageSetRequest:
    """What a request over several images asks for (`Job.images`)."""

    cameras: tuple[str, ...]            # surround: these cameras' latest frames, in prompt order; history: one
    history_frames: int = 0             # 0: surround view
    history_s: float = 0.0

    @property
    def count(self) -> int:
        """Images the answer reads."""
        return self.history_frames or len(self.cameras)

    @property
    def camera_field(self) -> str:
        """VlmResult.camera: the distinct cameras joined by ','."""
        return ','.join(dict.fromkeys(self.cameras))


@dataclass(frozen=True)
class SelectedImage:
    camera: str
    frame: Frame
    rgb: np.ndarray
    label: str

    @property
    def stamp(self) -> Any:
        return self.frame.msg.header.stamp


def image_set_request(request: Any, *, feeds: dict[str, CameraFeed], default_camera: str, has_inline: bool,
                      history_limit: int, no_frame_message: Callable[[CameraFeed], str]) -> ImageSetRequest | None:
    """The several-image part of a request (fields `cameras`, `history_frames`, `history_s`), checked.

    None for a single-image request. RequestRejected (saying what to fix) for names the node does not
    have, cameras without any frame yet, bad history sizes or fields that cannot go together.
    `history_limit` is the frames a camera buffers (frame_history_length).
    """
    cameras = [camera.strip() for camera in request.cameras]
    frames, span_s = int(request.history_frames), float(request.history_s)
    if not cameras and frames == 0:
        if span_s != 0:
            raise RequestRejected('history', f'history_s is {span_s:g} but history_frames is 0: give history_frames '
                                             f'>= 2 for a history question, or leave both 0')
        return None
    if has_inline:
        raise RequestRejected('images', 'the request has an image and also names cameras or a history: send '
                                        'either an image, or cameras / history_frames with an empty image')
    if cameras and frames:
        raise RequestRejected('images', (
            'cameras and history_frames cannot be combined: ask about several cameras\' latest frames '
            '(cameras) or about one camera\'s recent frames (camera, history_frames, history_s)'))
    if cameras:
        _check_camera_names(cameras, feeds)
        missing = [feeds[camera] for camera in cameras if feeds[camera].peek() is None]
        if missing:
            raise RequestRejected(('no_frame', tuple(feed.name for feed in missing)),
                                  '; '.join(no_frame_message(feed) for feed in missing))
        return ImageSetRequest(tuple(cameras))
    if not 2 <= frames <= history_limit:
        raise RequestRejected('history', (
            f'history_frames {frames} is out of range: use 2..{history_limit} (frame_history_length), or 0 '
            f'for the latest frame only'))
    if not (math.isfinite(span_s) and span_s > 0):
        raise RequestRejected('history', f'history_s {span_s:g} is invalid: give the span in seconds (> 0), e.g. 3.0')
    camera = request.camera.strip() or default_camera
    _check_camera_names([camera], feeds)
    if feeds[camera].peek() is None:
        raise RequestRejected(('no_frame', camera), no_frame_message(feeds[camera]))
    return ImageSetRequest((camera,), frames, span_s)


def _check_camera_names(cameras: list[str], feeds: dict[str, CameraFeed]) -> None:
    known = ', '.join(feeds)
    if any(not camera for camera in cameras):
        raise RequestRejected('unknown_camera', f'cameras has an empty name: list camera names ({known})')
    if len(set(cameras)) != len(cameras):
        raise RequestRejected('unknown_camera', f'cameras lists a camera twice ({cameras}): give each camera once')
    unknown = [camera for camera in cameras if camera not in feeds]
    if unknown:
        raise RequestRejected('unknown_camera', (
            f'unknown camera(s) {", ".join(map(repr, unknown))}: this node has {known} (parameter cameras)'))


def resolve_total_budget(token_budget: int, count: int, default_per_image: int) -> int:
    """A several-image request's total visual tokens: 0 means the node's token_budget per image."""
    if token_budget == 0:
        return default_per_image * count
    if token_budget < count:
        raise RequestRejected('token_budget', (
            f'token_budget {token_budget} is the total over the request\'s {count} images: use at least {count} '
            f'(one visual token each), or 0 = the node default ({default_per_image} per image)'))
    return token_budget


def run_image_set(job: Job, engine: Any, feeds: dict[str, CameraFeed], *, check_age: Callable[[str, Any], None],
                  age_ms: Callable[[Any], float],
                  publish_overlays: Callable[[list], None] | None = None) -> list[VlmResult]:
    """Take, check and decode the job's frames, ask the engine, one VlmResult per prompt (header: newest).

    check_age(camera, stamp) raises RequestRejected for a stale, future or unstamped frame; age_ms(stamp)
    is the node clock minus `stamp` (0 for an unstamped image). publish_overlays gets the answers'
    OverlayViews: per result, each image's with that image's own header.
    """
    spec: ImageSetRequest = job.images
    selected = _history(spec, feeds, check_age) if spec.history_frames else _surround(spec, feeds, check_age)
    inputs = [ImageInput(image.rgb, image.label, key=(image.camera, image.frame.seq)) for image in selected]
    outputs = engine.generate_images(inputs, job.prompts, token_budget=job.token_budget,
                                     max_new_tokens=job.max_new_tokens, should_stop=job.should_stop,
                                     on_token=job.on_token, reducer=job.reducer)
    if publish_overlays is not None:
        publish_overlays(image_set_views([(image.rgb, image.frame.msg.header) for image in selected], outputs))
    newest = max(selected, key=lambda image: stamp_to_seconds(image.stamp))
    images = [(image.camera, image.stamp, image.label) for image in selected]
    return [output_to_result(output, header=newest.frame.msg.header, camera=spec.camera_field,
                             image_age_ms=age_ms(newest.stamp), images=images) for output in outputs]


def _surround(spec: ImageSetRequest, feeds: dict[str, CameraFeed],
              check_age: Callable[[str, Any], None]) -> list[SelectedImage]:
    """Each camera's latest frame; one refusal naming every camera whose frame cannot be used."""
    frames = {camera: feeds[camera].take() for camera in spec.cameras}
    problems = []
    for camera, frame in frames.items():
        try:
            check_age(camera, frame.msg.header.stamp)
        except RequestRejected as rejected:
            problems.append(rejected)
    if problems:
        raise RequestRejected(('images', tuple(problem.key for problem in problems)),
                              '; '.join(str(problem) for problem in problems))
    return [SelectedImage(camera, frame, _decode(feeds[camera], frame), camera) for camera, frame in frames.items()]


def _history(spec: ImageSetRequest, feeds: dict[str, CameraFeed],
             check_age: Callable[[str, Any], None]) -> list[SelectedImage]:
    """The frames nearest to evenly spaced times over the last history_s, oldest first."""
    camera = spec.cameras[0]
    feed = feeds[camera]
    latest = feed.take()
    check_age(camera, latest.msg.header.stamp)
    buffered = feed.history.frames()
    stamps_s = [stamp_to_seconds(frame.msg.header.stamp) for frame in buffered]
    try:
        picks = pick_history(buffered, stamps_s, spec.history_frames, spec.history_s)
    except HistoryUnavailable as error:
        raise RequestRejected(('history', camera), (
            f'camera {camera!r} {HISTORY_UNAVAILABLE} {spec.history_frames} frames over the last {spec.history_s:g} s: '
            f'{error}; ask a shorter history_s, or raise frame_history_length / frame_history_bytes')) from None
    newest_s = max(stamps_s)
    return [SelectedImage(camera, pick.frame, _decode(feed, pick.frame), history_label(camera, newest_s - pick.stamp_s))
            for pick in picks]


def _decode(feed: CameraFeed, frame: Frame) -> np.ndarray:
    try:
        return feed.rgb(frame)
    except ImageConversionError as error:
        raise RequestRejected(('malformed', feed.name), f'camera {feed.name!r} sent a bad frame: {error}') from None
