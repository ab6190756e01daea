"""Preparation of real data: co-register a subject's contrasts to one reference and apply a brain mask.

The TUMSyn paper's only preprocessing is co-registration and skull-stripping; this does both with ITK: a rigid
(versor) or affine transform per moving image, found by Mattes mutual information (works across contrasts) with
regular-step gradient descent over a 3-level image pyramid, after a geometric centring. Every output is a new file
in ``output_dir`` (the reference and each moving image resampled onto the reference grid, masked when a mask is
given, with its JSON sidecar copied so prompts can still be read) plus the ITK transform of each moving image;
an input is never overwritten.

    python -m scripts.data.registration --reference sub-01_T1w.nii.gz --moving sub-01_T2w.nii.gz sub-01_FLAIR.nii.gz
        --output_dir OUT [--mask sub-01_desc-brain_mask.nii.gz] [--transform rigid|affine]
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

from ..engine.volume_io import atomic_path

TRANSFORMS = ("rigid", "affine")
SHRINK_FACTORS = (4, 2, 1)  # the pyramid: coarse levels find the gross pose, the full resolution refines it
SMOOTHING_SIGMAS_MM = (2.0, 1.0, 0.0)
HISTOGRAM_BINS = 32  # joint-histogram bins per image; more only add noise on small volumes
SAMPLING_FRACTION = 0.25  # of the fixed voxels, drawn at random (seeded) per level
ITERATIONS = 200


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]


def _read(path: str):
    import itk

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such image file")
    try:
        image = itk.imread(path, itk.F)
    except Exception as error:  # ITK raises RuntimeError or its own types for unreadable files
        raise ValueError(f"{path}: unreadable image ({error})") from None
    if image.GetImageDimension() != 3:
        raise ValueError(f"{path}: expected a 3D image, got {image.GetImageDimension()}D")
    return image


def _grid_centre(image) -> np.ndarray:
    """Physical position (mm, ITK's LPS) of the centre of an image's voxel grid."""
    size = np.asarray(image.GetLargestPossibleRegion().GetSize(), dtype=float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    return np.asarray(image.GetOrigin()) + direction @ (spacing * (size - 1) / 2)


def register(fixed, moving, transform: str = "rigid", seed: int = 0):
    """The ITK transform mapping ``fixed`` physical points onto ``moving`` (resample ``moving`` with it)."""
    import itk

    if transform not in TRANSFORMS:
        raise ValueError(f"transform: expected one of {TRANSFORMS}, got {transform!r}")
    image_type = type(fixed)
    # rigid: a versor (unit quaternion) rotation, ITK's best-behaved rigid parametrisation for gradient descent
    initial = (itk.VersorRigid3DTransform[itk.D] if transform == "rigid" else itk.AffineTransform[itk.D, 3]).New()
    # start by aligning the centres of the two image grids (no intensity assumption across contrasts), rotating
    # about the reference's centre
    fixed_centre = _grid_centre(fixed)
    initial.SetCenter(fixed_centre.tolist())
    initial.SetTranslation((_grid_centre(moving) - fixed_centre).tolist())

    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New()
    metric.SetNumberOfHistogramBins(HISTOGRAM_BINS)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    optimizer.SetLearningRate(1.0)  # at most ~1 mm of voxel shift per step, set by the physical-shift scales
    optimizer.SetMinimumStepLength(1e-4)
    optimizer.SetRelaxationFactor(0.5)
    optimizer.SetNumberOfIterations(ITERATIONS)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    optimizer.SetScalesEstimator(scales)

    method = itk.ImageRegistrationMethodv4[image_type, image_type].New(
        FixedImage=fixed, MovingImage=moving, Metric=metric, Optimizer=optimizer, InitialTransform=initial)
    method.SetNumberOfLevels(len(SHRINK_FACTORS))
    method.SetShrinkFactorsPerLevel(SHRINK_FACTORS)
    method.SetSmoothingSigmasPerLevel(SMOOTHING_SIGMAS_MM)
    method.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    method.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION)
    method.MetricSamplingReinitializeSeed(seed)
    method.InPlaceOn()
    method.Update()
    return method.GetModifiableTransform()


def _resample(moving, fixed, transform):
    import itk

    return itk.resample_image_filter(moving, transform=transform, use_reference_image=True, reference_image=fixed,
                                     default_pixel_value=0.0)


def _write(image, path: str, mask: np.ndarray | None) -> str:
    """Write ``image``, zeroed outside ``mask`` when given, atomically."""
    import itk

    if mask is not None:
        array = itk.array_view_from_image(image) * mask
        masked = itk.image_from_array(array.astype(np.float32))
        masked.CopyInformation(image)
        image = masked
    with atomic_path(path) as temporary:
        itk.imwrite(image, temporary)
    return path


def _copy_sidecar(source: str, target_image: str) -> None:
    sidecar = os.path.join(os.path.dirname(source), _stem(source) + ".json")
    if os.path.isfile(sidecar):
        shutil.copyfile(sidecar, os.path.join(os.path.dirname(target_image), _stem(target_image) + ".json"))


def register_subject(reference: str, moving: list[str], output_dir: str, mask: str | None = None,
                     transform: str = "rigid") -> dict[str, str]:
    """Co-register ``moving`` images to ``reference`` and mask all of them; returns input path -> output path.

    Outputs keep their input file names in ``output_dir`` (so a BIDS layout stays BIDS); each moving image also gets
    ``<stem>_to-reference.tfm``. ``mask`` (non-zero = brain) must be on the reference grid."""
    import itk

    inputs = [reference, *moving]
    outputs = {path: os.path.join(output_dir, os.path.basename(path)) for path in inputs}
    clashes = [p for p, o in outputs.items() if os.path.abspath(o) == os.path.abspath(p)]
    if clashes or len(set(outputs.values())) != len(inputs):
        raise ValueError(f"output_dir {output_dir!r}: would overwrite an input or write two images to one name "
                         f"({', '.join(clashes or inputs)}); choose another folder")
    fixed = _read(reference)
    brain = None
    if mask is not None:
        mask_image = _read(mask)
        brain = itk.array_from_image(mask_image) > 0
        if brain.shape != itk.array_view_from_image(fixed).shape or not np.allclose(
                np.asarray(mask_image.GetSpacing()), np.asarray(fixed.GetSpacing()), atol=1e-4):
            raise ValueError(f"{mask}: the mask must be on the reference grid of {reference}")
    os.makedirs(output_dir, exist_ok=True)
    _write(fixed, outputs[reference], brain)
    _copy_sidecar(reference, outputs[reference])
    for path in moving:
        found = register(fixed, _read(path), transform)
        _write(_resample(_read(path), fixed, found), outputs[path], brain)
        _copy_sidecar(path, outputs[path])
        itk.transformwrite([found], os.path.join(output_dir, _stem(path) + "_to-reference.tfm"))
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.registration", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the image every other one is registered to")
    parser.add_argument("--moving", nargs="+", required=True, help="the images to register")
    parser.add_argument("--output_dir", required=True, help="folder of the new files (never an input's folder)")
    parser.add_argument("--mask", default=None, help="brain mask on the reference grid (non-zero = brain)")
    parser.add_argument("--transform", default="rigid", choices=TRANSFORMS)
    args = parser.parse_args(argv)
    for source, written in register_subject(args.reference, args.moving, args.output_dir, args.mask,
                                            args.transform).items():
        print(f"{source} -> {written}")


if __name__ == "__main__":
    main()
