"""The far end for test_interfaces.py: a separate process that serves Ask and echoes VlmResult.

Ask: answers with the image's shape, encoding and a SHA-256 of its bytes, and copies the image header
into the result, so the caller can check that every field crossed the process boundary intact.
VlmResult: whatever arrives on `results_in` is republished unchanged on `results_out`.
"""
import hashlib
import sys

import rclpy
from rclpy.executors import ExternalShutdownException

from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.srv import Ask


def main(args=None):
    rclpy.init(args=args)
    node = rclpy.create_node('interface_peer')

    def answer(request, response):
        image = request.image
        digest = hashlib.sha256(bytes(image.data)).hexdigest()
        response.success = True
        response.message = f'{image.width}x{image.height} {image.encoding} step={image.step}'
        response.result.header = image.header
        response.result.prompt = request.question
        response.result.camera = request.camera
        response.result.text = digest
        response.result.token_budget = request.token_budget
        response.result.visual_tokens = request.max_new_tokens
        return response

    echo = node.create_publisher(VlmResult, 'results_out', 10)
    node.create_subscription(VlmResult, 'results_in', echo.publish, 10)
    node.create_service(Ask, 'ask', answer)
    print('ready', flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
