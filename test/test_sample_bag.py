"""vlm_make_sample_bag: real photographs in both rosbag2 storage formats, read back with rosbags and
decoded with the node's own converter."""
import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.node.conversions import ImageConversionError, message_to_rgb

TYPESTORE = get_typestore(Stores.ROS2_KILTED)


def read_bag(path):
    """[(topic, msgtype, log time ns, deserialised message)] in bag order."""
    with Reader(path) as reader:
        return [(connection.topic, connection.msgtype, log_ns, TYPESTORE.deserialize_cdr(raw, connection.msgtype))
                for connection, log_ns, raw in reader.messages()]


def stamp_ns(message):
    return message.header.stamp.sec * 10**9 + message.header.stamp.nanosec


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_bag_holds_the_photographs_on_a_raw_and_a_compressed_topic(tmp_path, storage):
    bag = sample_bag.write_sample_bag(tmp_path / 'bag', storage=storage, frames_per_topic=4)
    messages = read_bag(bag.path)

    assert bag.message_counts == {sample_bag.RAW_TOPIC: 4, sample_bag.COMPRESSED_TOPIC: 4,
                                  sample_bag.CAMERA_INFO_TOPIC: 4}
    assert any(bag.path.glob('*.mcap' if storage == 'mcap' else '*.db3'))
    size_bytes = sum(path.stat().st_size for path in bag.path.iterdir())
    assert size_bytes < 5e6

    raw = [(log_ns, message) for topic, _, log_ns, message in messages if topic == sample_bag.RAW_TOPIC]
    assert [message.encoding for _, message in raw] == ['rgb8', 'bgr8', 'rgb8', 'bgr8']
    for index, (log_ns, message) in enumerate(raw):
        # bgr8 frames carry the same photograph: decoding undoes the channel swap exactly
        np.testing.assert_array_equal(message_to_rgb(message), sample_bag.sample_image(index))
        assert stamp_ns(message) == log_ns == sample_bag.DEFAULT_START_NS + index * 100_000_000

    compressed = [(log_ns, message) for topic, _, log_ns, message in messages
                  if topic == sample_bag.COMPRESSED_TOPIC]
    assert len(compressed) == 4
    for index, (log_ns, message) in enumerate(compressed):
        assert message.format == 'jpeg'
        expected = sample_bag.sample_image(len(sample_bag.SAMPLE_IMAGE_NAMES) - 1 - index).astype(float)
        decoded = message_to_rgb(message).astype(float)
        assert decoded.shape == expected.shape
        assert np.abs(decoded - expected).mean() < 4.0  # jpeg at quality 90
        assert stamp_ns(message) == log_ns == sample_bag.DEFAULT_START_NS + index * 100_000_000 + 50_000_000

    log_times = [log_ns for _, _, log_ns, _ in messages]
    assert log_times == sorted(log_times)
    assert bag.good_frame_stamps[sample_bag.RAW_TOPIC] == [stamp_ns(message) for _, message in raw]


def test_bad_frames_fail_to_decode_with_clear_reasons(tmp_path):
    bag = sample_bag.write_sample_bag(tmp_path / 'bag', storage='mcap', with_bad_frames=True)
    bad_stamps = {frame.stamp_ns: frame.topic for frame in bag.bad_frames}
    assert sorted(bad_stamps.values()) == sorted([sample_bag.COMPRESSED_TOPIC, sample_bag.RAW_TOPIC])

    reasons = {}
    good = 0
    for topic, msgtype, _, message in read_bag(bag.path):
        if topic == sample_bag.CAMERA_INFO_TOPIC:
            continue
        if stamp_ns(message) in bad_stamps:
            with pytest.raises(ImageConversionError) as error:
                message_to_rgb(message)
            reasons[topic] = str(error.value)
        else:
            assert message_to_rgb(message).ndim == 3
            good += 1
    assert good == 8
    assert 'step*height' in reasons[sample_bag.RAW_TOPIC]
    assert 'cannot be decoded' in reasons[sample_bag.COMPRESSED_TOPIC]


def test_cli_writes_a_bag_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / 'drive'
    assert sample_bag.main([str(out), '--storage', 'sqlite3', '--frames', '2', '--with-bad-frames']) == 0
    assert 'sqlite3' in capsys.readouterr().out
    with Reader(out) as reader:
        assert reader.topics[sample_bag.RAW_TOPIC].msgcount == 3  # 2 good + 1 malformed

    assert sample_bag.main([str(out)]) == 1
    error = capsys.readouterr().err
    assert 'already exists' in error and error.count('\n') == 1

    assert sample_bag.main([str(tmp_path / 'missing' / 'bag')]) == 1
    assert 'does not exist' in capsys.readouterr().err
