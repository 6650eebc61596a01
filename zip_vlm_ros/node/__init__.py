"""The ROS 2 side: the lifecycle node ``zip_vlm`` and what it is made of.

``vlm_node`` the node: parameters, frames, services, the worker thread that runs the engine;
``parameters`` their specs, descriptions and checks; ``jobs`` queue, jobs, deadlines and stats (no rclpy);
``ask_action`` the streamed ``~/ask_action``; ``image_sets`` surround-view and history requests;
``frame_history`` a camera's ring buffer (no rclpy); ``diagnostics`` the /diagnostics status;
``conversions`` sensor_msgs images <-> RGB arrays, engine outputs -> VlmResult; ``spinning`` an executor
in a thread, stopped in the order rclpy needs.

Nothing here is imported by ``zip_vlm_ros.engine``: the engine knows nothing of ROS.
"""
