"""GET /model: the served model and the operating points its card calibrates (the FARs /verify decides at, the
FPIR range of /gallery/search, the quality floors), for clients and the web console's pickers.

Open without an API key, like /readyz: it describes the service, holds no one's data, and /metrics already names
the model; the console shows it before a key is entered.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import AppSettings, Faces
from service.schemas import ServedModel

router = APIRouter()


@router.get("/model", response_model=ServedModel, summary="The served model, its calibrated FARs, FPIRs and floors")
async def served_model(request: Request, faces: Faces, settings: AppSettings) -> ServedModel:
    card = faces.card
    calibration = card.calibration
    open_set = calibration.open_set if calibration else None
    floors = calibration.floors if calibration else None
    return ServedModel(
        name=card.name, version=card.version, architecture=card.architecture, runtime=faces.pipeline.engine.runtime,
        embedding_size=card.embedding_size, input_size=card.input.size, flip_tta=card.flip_tta,
        quality=card.quality is not None, fars=sorted(calibration.thresholds) if calibration else [],
        default_far=settings.default_far, fpir_range=open_set.fpir_range if open_set else None,
        default_fpir=settings.default_fpir if open_set else None,
        probe_floor=floors.probe if floors else None, enrolment_floor=floors.enrolment if floors else None,
        min_face_size=settings.min_face_size, calibration_data=calibration.dataset if calibration else None,
        templates=request.app.state.templates_off)
