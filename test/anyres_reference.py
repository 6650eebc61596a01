"""An independent construction of the VisionZip authors' AnyRes layout (restore_image_features_sorted in
dvlab-research/VisionZip, visionzip/llava_arch.py), for comparing zip_vlm_ros.models.anyres against."""
import torch


def reference_layout(crop_tokens, dominant_indices, contextual, grid_shape, patches_per_side):
    """The authors' construction, written out independently: scatter each grid crop's kept patches into
    a full [crops, P*P] canvas with a mask, stitch the canvases into the image grid, read the mask's
    positions in raster order; then the grid crops' CLS tokens, then their contextual tokens."""
    grid_height, grid_width = grid_shape
    side = patches_per_side
    grid = crop_tokens[1:]
    num_grid, kept, hidden = grid.shape
    canvas = torch.zeros(num_grid, side * side, hidden, dtype=grid.dtype)
    mask = torch.zeros(num_grid, side * side, dtype=torch.bool)
    for crop in range(num_grid):
        for slot, position in enumerate(dominant_indices[1 + crop, 1:].tolist()):
            canvas[crop, position - 1] = grid[crop, 1 + slot]
            mask[crop, position - 1] = True
    stitched = canvas.view(grid_height, grid_width, side, side, hidden).permute(0, 2, 1, 3, 4)
    stitched = stitched.reshape(grid_height * side, grid_width * side, hidden)
    stitched_mask = mask.view(grid_height, grid_width, side, side).permute(0, 2, 1, 3)
    stitched_mask = stitched_mask.reshape(grid_height * side, grid_width * side)
    parts = [crop_tokens[0], stitched[stitched_mask], grid[:, 0]]
    if contextual:
        parts.append(grid[:, -contextual:].reshape(-1, hidden))
    return torch.cat(parts)
