"""The HTTP routes, one APIRouter per resource; `create_app` (service/app.py) includes them all.

    classify.py        POST /classify (the service's own protocol; a pipeline Front)
    open_inference.py  /v2: the Open Inference Protocol (KServe v2); POST /v2/models/{name}/infer is a pipeline Front
    models.py          GET /v1/models, /v1/models/{name}, /v1/models/{name}/card
    health.py          GET /healthz, /readyz and GET /metrics
    demo.py            GET / (the demo page) and GET/POST /v1/attack
    docs.py            GET /docs (Swagger UI from local files)

Routes reach the runtime through `service.dependencies` (typed), never through state they close over; the two
inference routes hand their request to service/pipeline.py, which owns everything between reading and answering.
"""
