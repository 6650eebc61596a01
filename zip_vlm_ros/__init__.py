"""zip_vlm_ros: LLaVA with VisionZip token reduction, served to ROS 2.

The generated interfaces (``zip_vlm_ros.msg``, ``zip_vlm_ros.srv``) and these sources share the package
name. In a colcon install they sit in one folder. In the pip route the interfaces are built into the
venv's site-packages (a folder without ``__init__.py``) while the sources are used in place, so that
editing them needs no reinstall; extending ``__path__`` lets both halves import as one package.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
