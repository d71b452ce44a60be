"""DICOM export: one MR Image Storage series per reconstructed series (pydicom).

Geometry comes from the ISMRMRD acquisition headers (patient coordinates, LPS, as in DICOM):
``ImageOrientationPatient`` = (read_dir, phase_dir), ``ImagePositionPatient`` = centre of the first
transmitted pixel, derived from the slice centre ``position`` (pixel ``N//2`` is the isocentre after
the centred FFT). Cine frames carry ``TriggerTime``. Decimal strings are formatted with
``DSfloat(auto_format=True)`` so no value exceeds DICOM's 16-character limit.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import DSfloat

from gadgets.messages import ImageSeries


def _ds(x: float) -> DSfloat:
    return DSfloat(float(x), auto_format=True)


def _header_facts(header_xml: str) -> dict[str, Any]:
    """Patient/study/sequence facts from the ISMRMRD XML header (all optional)."""
    facts: dict[str, Any] = {}
    if not header_xml:
        return facts
    try:
        import ismrmrd.xsd

        hdr = ismrmrd.xsd.CreateFromDocument(header_xml)
    except Exception:  # noqa: BLE001 - a header we cannot parse just gives default DICOM values
        return facts
    subj = getattr(hdr, "subjectInformation", None)
    if subj is not None:
        facts["patient_name"] = getattr(subj, "patientName", None)
        facts["patient_id"] = getattr(subj, "patientID", None)
        facts["patient_weight"] = getattr(subj, "patientWeight_kg", None)
    study = getattr(hdr, "studyInformation", None)
    if study is not None:
        facts["study_uid"] = getattr(study, "studyInstanceUID", None)
        facts["study_id"] = getattr(study, "studyID", None)
    meas = getattr(hdr, "measurementInformation", None)
    if meas is not None:
        facts["protocol_name"] = getattr(meas, "protocolName", None)
        facts["frame_of_reference_uid"] = getattr(meas, "frameOfReferenceUID", None)
        facts["series_uid"] = getattr(meas, "seriesInstanceUIDRoot", None)
    sys_info = getattr(hdr, "acquisitionSystemInformation", None)
    if sys_info is not None:
        facts["manufacturer"] = getattr(sys_info, "systemVendor", None)
        facts["model"] = getattr(sys_info, "systemModel", None)
        facts["field_T"] = getattr(sys_info, "systemFieldStrength_T", None)
    seq = getattr(hdr, "sequenceParameters", None)
    if seq is not None:
        for key, name in (("TR", "tr_ms"), ("TE", "te_ms"), ("flipAngle_deg", "flip_deg")):
            vals = getattr(seq, key, None)
            if vals:
                facts[name] = float(vals[0])
    exp = getattr(hdr, "experimentalConditions", None)
    if exp is not None and getattr(exp, "H1resonanceFrequency_Hz", None):
        facts["imaging_frequency_MHz"] = float(exp.H1resonanceFrequency_Hz) / 1e6
    return {k: v for k, v in facts.items() if v not in (None, "")}


def _valid_uid(uid: Optional[str]) -> bool:
    return bool(uid) and len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) and not uid.startswith(".")


def write_dicom_series(series: ImageSeries, magnitude: np.ndarray, out_dir: Path, header_xml: str = "",
                       series_number: int = 1, series_description: str = "torchgadgets") -> list[Path]:
    """Write ``magnitude`` ``[F, Ny, Nx]`` as one DICOM MR series; returns the file paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = _header_facts(header_xml)
    mag = np.asarray(magnitude, dtype=np.float32)
    peak = float(mag.max()) if mag.size else 0.0
    scale = 4095.0 / peak if peak > 0 else 1.0
    pixels = np.clip(np.round(mag * scale), 0, 4095).astype(np.uint16)
    n_frames, ny, nx = pixels.shape
    fov = [float(v) for v in series.fov_mm] + [0.0] * 3
    dx = fov[0] / nx if fov[0] > 0 else 1.0
    dy = fov[1] / ny if fov[1] > 0 else 1.0
    thickness = fov[2] if fov[2] > 0 else None

    now = _dt.datetime.now()
    study_uid = facts.get("study_uid") if _valid_uid(facts.get("study_uid")) else None
    study_uid = study_uid or generate_uid(entropy_srcs=[header_xml or "torchgadgets-study"])
    for_uid = facts.get("frame_of_reference_uid")
    for_uid = for_uid if _valid_uid(for_uid) else generate_uid(entropy_srcs=[study_uid, "for"])
    series_uid = generate_uid(entropy_srcs=[study_uid, str(series_number), series.method, str(series.slice),
                                            str(series.repetition), str(series.contrast), str(series.set),
                                            now.isoformat()])
    paths = []
    for f in range(n_frames):
        ref = series.ref_headers[min(f, len(series.ref_headers) - 1)] if series.ref_headers else None
        read = np.array(ref.read_dir, dtype=float) if ref is not None else np.zeros(3)
        phase = np.array(ref.phase_dir, dtype=float) if ref is not None else np.zeros(3)
        if np.linalg.norm(read) < 0.5 or np.linalg.norm(phase) < 0.5:
            read, phase = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
        centre = np.array(ref.position, dtype=float) if ref is not None else np.zeros(3)
        corner = centre - (nx // 2) * dx * read - (ny // 2) * dy * phase
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(f)])

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"series{series_number:03d}_img{f + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        # Patient / study
        ds.PatientName = str(facts.get("patient_name", "Anonymous^Patient"))[:64]
        ds.PatientID = str(facts.get("patient_id", "torchgadgets"))[:64]
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyID = str(facts.get("study_id", "1"))[:16]
        ds.AccessionNumber = ""
        # Series / equipment / frame of reference
        ds.Modality = "MR"
        ds.Laterality = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = series_description[:64]
        ds.ProtocolName = str(facts.get("protocol_name", series_description))[:64]
        ds.Manufacturer = str(facts.get("manufacturer", "torchgadgets"))[:64]
        ds.ManufacturerModelName = str(facts.get("model", ""))[:64]
        ds.SoftwareVersions = "torchgadgets 0.1"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        # Image
        ds.InstanceNumber = f + 1
        ds.AcquisitionNumber = 1
        ds.ImageComments = f"torchgadgets {series.method}"[:64]
        ds.ImageOrientationPatient = [_ds(v) for v in list(read) + list(phase)]
        ds.ImagePositionPatient = [_ds(v) for v in corner]
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        if thickness is not None:
            ds.SliceThickness = _ds(thickness)
        ds.SliceLocation = _ds(float(np.dot(centre, np.cross(read, phase))))
        # MR image module
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        cardiac = n_frames > 1 and series.frame_axis == "phase"
        ds.ScanOptions = "CG" if cardiac else ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = _ds(facts.get("tr_ms", 0.0))
        ds.EchoTime = _ds(facts.get("te_ms", 0.0))
        ds.EchoTrainLength = 1
        if "flip_deg" in facts:
            ds.FlipAngle = _ds(facts["flip_deg"])
        if "imaging_frequency_MHz" in facts:
            ds.ImagingFrequency = _ds(facts["imaging_frequency_MHz"])
        if "field_T" in facts:
            ds.MagneticFieldStrength = _ds(facts["field_T"])
        if cardiac:
            t_ms = 0.0
            if series.frame_times_s is not None and f < len(series.frame_times_s):
                t_ms = 1000.0 * float(series.frame_times_s[f] - series.frame_times_s[0])
            ds.TriggerTime = _ds(t_ms)
            ds.CardiacNumberOfImages = n_frames
        # Pixels
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds(2048)
        ds.WindowWidth = _ds(4096)
        ds.PixelData = pixels[f].tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
