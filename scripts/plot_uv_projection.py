"""Draw a scene's points projected into one frame (the README picture of build_uv_index).

Left: the colour frame with every valid point of the uv index, green where ``conf_2d = 1``
(consistent with the depth map) and red where occluded or without depth. Right: the frame's
depth map (own resolution, shown stretched to the colour size) with the same points.

    python scripts/plot_uv_projection.py --scene scene0000_00 --frame 0 \
        --out docs/img/uv_projection.png

Paths and projection settings default to the ``build_uv_index`` section of params.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import cv2

from featcache.datasets import scannet
from featcache.config import build_dataclass, load_stage_params
from featcache.verify.pictures import add_caption, render_panels
from featcache.stages.build_uv_index import STAGE, UvIndexParams, index_frame, load_points, read_frame

log = logging.getLogger("plot_uv_projection")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params.yaml with build_uv_index")
    ap.add_argument("--scannet", help="ScanNet root (default: build_uv_index.scannet)")
    ap.add_argument("--scene", default="scene0000_00")
    ap.add_argument("--frame", default="0", help="frame id as in the file names")
    ap.add_argument("--zoom", type=int, default=2)
    ap.add_argument("--out", default="docs/img/uv_projection.png")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    _, params = load_stage_params(STAGE, UvIndexParams, args.params)
    if args.scannet:
        params = build_dataclass(UvIndexParams,
                                 {**dataclasses.asdict(params), "scannet": args.scannet}, STAGE)
    scene_dir = Path(params.scannet) / "scans" / args.scene
    frame = read_frame(scene_dir, args.frame, params.depth_scale)
    points = load_points(scene_dir / params.point_cloud.format(scene=args.scene))
    arrays = index_frame(points, frame, params)
    color = cv2.imread(str(scannet.frame_paths(scene_dir, args.frame).color), cv2.IMREAD_COLOR)
    image = render_panels(color, frame.depth, arrays, args.zoom)
    n_valid, n_vis = int(arrays["valid"].sum()), int((arrays["conf_2d"] > 0).sum())
    image = add_caption(image, f"{args.scene} frame {args.frame}: {n_valid} of {len(points)} "
                        f"points in view, green {n_vis} visible (conf_2d=1), red {n_valid - n_vis}"
                        f" occluded; re-projection error {float(arrays['reproj_err_px']):.1e} px")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, image)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
