from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_FORWARD: _ClassVar[Direction]
    DIRECTION_BACKWARD: _ClassVar[Direction]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT8_BLOCK64: _ClassVar[DType]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_STAGE: _ClassVar[Role]
    ROLE_STANDBY: _ClassVar[Role]
    ROLE_OFFLINE: _ClassVar[Role]
    ROLE_BANNED: _ClassVar[Role]

class AuditKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_KIND_UNSPECIFIED: _ClassVar[AuditKind]
    AUDIT_KIND_FORWARD: _ClassVar[AuditKind]
    AUDIT_KIND_BACKWARD: _ClassVar[AuditKind]
    AUDIT_KIND_UPDATE: _ClassVar[AuditKind]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_PASS: _ClassVar[Verdict]
    VERDICT_FAIL: _ClassVar[Verdict]
    VERDICT_ERROR: _ClassVar[Verdict]

class RunPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_PHASE_UNSPECIFIED: _ClassVar[RunPhase]
    RUN_PHASE_WAITING: _ClassVar[RunPhase]
    RUN_PHASE_TRAINING: _ClassVar[RunPhase]
    RUN_PHASE_FINISHED: _ClassVar[RunPhase]
    RUN_PHASE_FAILED: _ClassVar[RunPhase]
    RUN_PHASE_STOPPED: _ClassVar[RunPhase]

class DigestAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIGEST_ALGORITHM_UNSPECIFIED: _ClassVar[DigestAlgorithm]
    DIGEST_ALGORITHM_SHA256: _ClassVar[DigestAlgorithm]
    DIGEST_ALGORITHM_BLAKE3: _ClassVar[DigestAlgorithm]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_COORDINATOR_STARTED: _ClassVar[EventKind]
    EVENT_KIND_WAITING: _ClassVar[EventKind]
    EVENT_KIND_TRAINING: _ClassVar[EventKind]
    EVENT_KIND_STEP: _ClassVar[EventKind]
    EVENT_KIND_STEP_FAILED: _ClassVar[EventKind]
    EVENT_KIND_FINISHED: _ClassVar[EventKind]
    EVENT_KIND_STOPPED: _ClassVar[EventKind]
    EVENT_KIND_RUN_FAILED: _ClassVar[EventKind]
    EVENT_KIND_AUDIT_RATE: _ClassVar[EventKind]
    EVENT_KIND_NODE_REGISTERED: _ClassVar[EventKind]
    EVENT_KIND_NODE_BACK: _ClassVar[EventKind]
    EVENT_KIND_NODE_OFFLINE: _ClassVar[EventKind]
    EVENT_KIND_NODE_SET_ASIDE: _ClassVar[EventKind]
    EVENT_KIND_NODE_DEMOTED: _ClassVar[EventKind]
    EVENT_KIND_BANNED: _ClassVar[EventKind]
    EVENT_KIND_UNBANNED: _ClassVar[EventKind]
    EVENT_KIND_STAGE_ASSIGNED: _ClassVar[EventKind]
    EVENT_KIND_STAGE_SKIPPED: _ClassVar[EventKind]
    EVENT_KIND_ASSIGN_FAILED: _ClassVar[EventKind]
    EVENT_KIND_ROLLED_BACK: _ClassVar[EventKind]
    EVENT_KIND_CHECKPOINT: _ClassVar[EventKind]
    EVENT_KIND_CHECKPOINT_FAILED: _ClassVar[EventKind]
    EVENT_KIND_COMMITMENT_MISMATCH: _ClassVar[EventKind]
    EVENT_KIND_AUDIT_FAILED: _ClassVar[EventKind]
    EVENT_KIND_AUDIT_INCOMPLETE: _ClassVar[EventKind]
    EVENT_KIND_AUDIT_ERROR: _ClassVar[EventKind]
    EVENT_KIND_AUDIT_UNFOLDED: _ClassVar[EventKind]
    EVENT_KIND_STATE_WITHHELD: _ClassVar[EventKind]
    EVENT_KIND_OFF_ATTESTATION: _ClassVar[EventKind]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_FORWARD: Direction
DIRECTION_BACKWARD: Direction
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT8_BLOCK64: DType
ROLE_UNSPECIFIED: Role
ROLE_STAGE: Role
ROLE_STANDBY: Role
ROLE_OFFLINE: Role
ROLE_BANNED: Role
AUDIT_KIND_UNSPECIFIED: AuditKind
AUDIT_KIND_FORWARD: AuditKind
AUDIT_KIND_BACKWARD: AuditKind
AUDIT_KIND_UPDATE: AuditKind
VERDICT_UNSPECIFIED: Verdict
VERDICT_PASS: Verdict
VERDICT_FAIL: Verdict
VERDICT_ERROR: Verdict
RUN_PHASE_UNSPECIFIED: RunPhase
RUN_PHASE_WAITING: RunPhase
RUN_PHASE_TRAINING: RunPhase
RUN_PHASE_FINISHED: RunPhase
RUN_PHASE_FAILED: RunPhase
RUN_PHASE_STOPPED: RunPhase
DIGEST_ALGORITHM_UNSPECIFIED: DigestAlgorithm
DIGEST_ALGORITHM_SHA256: DigestAlgorithm
DIGEST_ALGORITHM_BLAKE3: DigestAlgorithm
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_COORDINATOR_STARTED: EventKind
EVENT_KIND_WAITING: EventKind
EVENT_KIND_TRAINING: EventKind
EVENT_KIND_STEP: EventKind
EVENT_KIND_STEP_FAILED: EventKind
EVENT_KIND_FINISHED: EventKind
EVENT_KIND_STOPPED: EventKind
EVENT_KIND_RUN_FAILED: EventKind
EVENT_KIND_AUDIT_RATE: EventKind
EVENT_KIND_NODE_REGISTERED: EventKind
EVENT_KIND_NODE_BACK: EventKind
EVENT_KIND_NODE_OFFLINE: EventKind
EVENT_KIND_NODE_SET_ASIDE: EventKind
EVENT_KIND_NODE_DEMOTED: EventKind
EVENT_KIND_BANNED: EventKind
EVENT_KIND_UNBANNED: EventKind
EVENT_KIND_STAGE_ASSIGNED: EventKind
EVENT_KIND_STAGE_SKIPPED: EventKind
EVENT_KIND_ASSIGN_FAILED: EventKind
EVENT_KIND_ROLLED_BACK: EventKind
EVENT_KIND_CHECKPOINT: EventKind
EVENT_KIND_CHECKPOINT_FAILED: EventKind
EVENT_KIND_COMMITMENT_MISMATCH: EventKind
EVENT_KIND_AUDIT_FAILED: EventKind
EVENT_KIND_AUDIT_INCOMPLETE: EventKind
EVENT_KIND_AUDIT_ERROR: EventKind
EVENT_KIND_AUDIT_UNFOLDED: EventKind
EVENT_KIND_STATE_WITHHELD: EventKind
EVENT_KIND_OFF_ATTESTATION: EventKind

class TensorHeader(_message.Message):
    __slots__ = ("run_id", "step", "micro_batch", "stage", "direction", "sender", "receiver", "dtype", "shape", "epoch", "attempt", "assignment_digest", "input_digest", "grad_input_digest", "digest_algorithm")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    micro_batch: int
    stage: int
    direction: Direction
    sender: str
    receiver: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    attempt: int
    assignment_digest: bytes
    input_digest: bytes
    grad_input_digest: bytes
    digest_algorithm: DigestAlgorithm
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., stage: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., sender: _Optional[str] = ..., receiver: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., attempt: _Optional[int] = ..., assignment_digest: _Optional[bytes] = ..., input_digest: _Optional[bytes] = ..., grad_input_digest: _Optional[bytes] = ..., digest_algorithm: _Optional[_Union[DigestAlgorithm, str]] = ...) -> None: ...

class TensorCommitment(_message.Message):
    __slots__ = ("header", "payload_digest", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    payload_digest: bytes
    signature: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., payload_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data", "payload_digest", "signature", "header_signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    HEADER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    data: bytes
    payload_digest: bytes
    signature: bytes
    header_signature: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., payload_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., header_signature: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("client_nonce",)
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    client_nonce: bytes
    def __init__(self, client_nonce: _Optional[bytes] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("coordinator_key", "run_id", "challenge", "client_nonce", "signature")
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    coordinator_key: bytes
    run_id: str
    challenge: bytes
    client_nonce: bytes
    signature: bytes
    def __init__(self, coordinator_key: _Optional[bytes] = ..., run_id: _Optional[str] = ..., challenge: _Optional[bytes] = ..., client_nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("public_key", "address", "challenge", "version", "signature", "build")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    address: str
    challenge: bytes
    version: str
    signature: bytes
    build: NodeBuild
    def __init__(self, public_key: _Optional[bytes] = ..., address: _Optional[str] = ..., challenge: _Optional[bytes] = ..., version: _Optional[str] = ..., signature: _Optional[bytes] = ..., build: _Optional[_Union[NodeBuild, _Mapping]] = ...) -> None: ...

class NodeBuild(_message.Message):
    __slots__ = ("torch_version", "device", "threads", "cuda_version")
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    torch_version: str
    device: str
    threads: int
    cuda_version: str
    def __init__(self, torch_version: _Optional[str] = ..., device: _Optional[str] = ..., threads: _Optional[int] = ..., cuda_version: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "run_id", "heartbeat_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    run_id: str
    heartbeat_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., run_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class PeerCounters(_message.Message):
    __slots__ = ("peer", "accepted", "rejected", "last_reason", "unattributed")
    PEER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    peer: str
    accepted: int
    rejected: int
    last_reason: str
    unattributed: int
    def __init__(self, peer: _Optional[str] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., last_reason: _Optional[str] = ..., unattributed: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "seq", "tensors_sent", "tensors_received", "tensors_rejected", "peers", "signature", "members_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSORS_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    seq: int
    tensors_sent: int
    tensors_received: int
    tensors_rejected: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerCounters]
    signature: bytes
    members_version: int
    def __init__(self, node_id: _Optional[str] = ..., seq: _Optional[int] = ..., tensors_sent: _Optional[int] = ..., tensors_received: _Optional[int] = ..., tensors_rejected: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerCounters, _Mapping]]] = ..., signature: _Optional[bytes] = ..., members_version: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("role", "stage", "step", "banned", "members", "seq", "signature", "members_version")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    role: Role
    stage: int
    step: int
    banned: _containers.RepeatedScalarFieldContainer[str]
    members: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    seq: int
    signature: bytes
    members_version: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., stage: _Optional[int] = ..., step: _Optional[int] = ..., banned: _Optional[_Iterable[str]] = ..., members: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., seq: _Optional[int] = ..., signature: _Optional[bytes] = ..., members_version: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    def __init__(self, block_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., n_layer: _Optional[int] = ..., n_head: _Optional[int] = ..., n_embd: _Optional[int] = ..., dropout: _Optional[float] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("seed", "micro_batches", "micro_batch_size", "lr", "warmup_steps", "total_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "max_in_flight", "retention_steps", "compute_dtype", "wire_dtype")
    SEED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RETENTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    seed: int
    micro_batches: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    max_in_flight: int
    retention_steps: int
    compute_dtype: str
    wire_dtype: str
    def __init__(self, seed: _Optional[int] = ..., micro_batches: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., grad_clip: _Optional[float] = ..., max_in_flight: _Optional[int] = ..., retention_steps: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address", "public_key", "stage")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    public_key: bytes
    stage: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., public_key: _Optional[bytes] = ..., stage: _Optional[int] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("run_id", "epoch", "stage", "num_stages", "model", "train", "prev", "next", "node_id", "data_digest", "start_step", "signature", "state_digest", "tolerance")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    stage: int
    num_stages: int
    model: ModelSpec
    train: TrainSpec
    prev: PeerInfo
    next: PeerInfo
    node_id: str
    data_digest: bytes
    start_step: int
    signature: bytes
    state_digest: bytes
    tolerance: float
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., prev: _Optional[_Union[PeerInfo, _Mapping]] = ..., next: _Optional[_Union[PeerInfo, _Mapping]] = ..., node_id: _Optional[str] = ..., data_digest: _Optional[bytes] = ..., start_step: _Optional[int] = ..., signature: _Optional[bytes] = ..., state_digest: _Optional[bytes] = ..., tolerance: _Optional[float] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("state_digest", "num_params")
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    state_digest: bytes
    num_params: int
    def __init__(self, state_digest: _Optional[bytes] = ..., num_params: _Optional[int] = ...) -> None: ...

class AssignmentTerms(_message.Message):
    __slots__ = ("run_id", "stage", "num_stages", "model", "train", "data_digest", "tolerance")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage: int
    num_stages: int
    model: ModelSpec
    train: TrainSpec
    data_digest: bytes
    tolerance: float
    def __init__(self, run_id: _Optional[str] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., data_digest: _Optional[bytes] = ..., tolerance: _Optional[float] = ...) -> None: ...

class RunStepRequest(_message.Message):
    __slots__ = ("run_id", "epoch", "step", "node_id", "signature", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    step: int
    node_id: str
    signature: bytes
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., node_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("run_id", "step", "stage", "node_id", "state_digest", "loss", "grad_sq_norm", "compute_seconds", "micro_batches", "signature", "flags", "epoch", "attempt", "assignment_digest", "received")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    stage: int
    node_id: str
    state_digest: bytes
    loss: float
    grad_sq_norm: float
    compute_seconds: float
    micro_batches: int
    signature: bytes
    flags: _containers.RepeatedCompositeFieldContainer[ScreenFlag]
    epoch: int
    attempt: int
    assignment_digest: bytes
    received: _containers.RepeatedCompositeFieldContainer[ReceivedDigest]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., stage: _Optional[int] = ..., node_id: _Optional[str] = ..., state_digest: _Optional[bytes] = ..., loss: _Optional[float] = ..., grad_sq_norm: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., micro_batches: _Optional[int] = ..., signature: _Optional[bytes] = ..., flags: _Optional[_Iterable[_Union[ScreenFlag, _Mapping]]] = ..., epoch: _Optional[int] = ..., attempt: _Optional[int] = ..., assignment_digest: _Optional[bytes] = ..., received: _Optional[_Iterable[_Union[ReceivedDigest, _Mapping]]] = ...) -> None: ...

class ReceivedDigest(_message.Message):
    __slots__ = ("direction", "micro_batch", "payload_digest")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    direction: Direction
    micro_batch: int
    payload_digest: bytes
    def __init__(self, direction: _Optional[_Union[Direction, str]] = ..., micro_batch: _Optional[int] = ..., payload_digest: _Optional[bytes] = ...) -> None: ...

class ScreenFlag(_message.Message):
    __slots__ = ("direction", "micro_batch", "reason")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    direction: Direction
    micro_batch: int
    reason: str
    def __init__(self, direction: _Optional[_Union[Direction, str]] = ..., micro_batch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ApplyUpdateRequest(_message.Message):
    __slots__ = ("run_id", "epoch", "step", "node_id", "global_grad_norm", "lr", "signature", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    step: int
    node_id: str
    global_grad_norm: float
    lr: float
    signature: bytes
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., node_id: _Optional[str] = ..., global_grad_norm: _Optional[float] = ..., lr: _Optional[float] = ..., signature: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class UpdateReport(_message.Message):
    __slots__ = ("run_id", "step", "stage", "node_id", "state_digest", "signature", "epoch", "attempt", "assignment_digest")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    stage: int
    node_id: str
    state_digest: bytes
    signature: bytes
    epoch: int
    attempt: int
    assignment_digest: bytes
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., stage: _Optional[int] = ..., node_id: _Optional[str] = ..., state_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., epoch: _Optional[int] = ..., attempt: _Optional[int] = ..., assignment_digest: _Optional[bytes] = ...) -> None: ...

class AbortStepRequest(_message.Message):
    __slots__ = ("run_id", "step", "node_id", "signature", "epoch", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    node_id: str
    signature: bytes
    epoch: int
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., node_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., epoch: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "include_optimizer", "signature", "step", "requester", "stage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    include_optimizer: bool
    signature: bytes
    step: int
    requester: str
    stage: int
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., include_optimizer: _Optional[bool] = ..., signature: _Optional[bytes] = ..., step: _Optional[int] = ..., requester: _Optional[str] = ..., stage: _Optional[int] = ...) -> None: ...

class StateAttestation(_message.Message):
    __slots__ = ("run_id", "node_id", "stage", "step", "state_digest", "signature", "epoch")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    stage: int
    step: int
    state_digest: bytes
    signature: bytes
    epoch: int
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., stage: _Optional[int] = ..., step: _Optional[int] = ..., state_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class FetchTensorRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "step", "micro_batch", "direction", "sent", "requester", "signature", "more", "commitment_only")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    step: int
    micro_batch: int
    direction: Direction
    sent: bool
    requester: str
    signature: bytes
    more: _containers.RepeatedCompositeFieldContainer[TensorRef]
    commitment_only: bool
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., sent: _Optional[bool] = ..., requester: _Optional[str] = ..., signature: _Optional[bytes] = ..., more: _Optional[_Iterable[_Union[TensorRef, _Mapping]]] = ..., commitment_only: _Optional[bool] = ...) -> None: ...

class TensorRef(_message.Message):
    __slots__ = ("micro_batch", "direction", "sent")
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    micro_batch: int
    direction: Direction
    sent: bool
    def __init__(self, micro_batch: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., sent: _Optional[bool] = ...) -> None: ...

class FetchCheckpointRequest(_message.Message):
    __slots__ = ("run_id", "stage", "step", "requester", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage: int
    step: int
    requester: str
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., stage: _Optional[int] = ..., step: _Optional[int] = ..., requester: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("run_id", "audit_id", "kind", "step", "stage", "micro_batch", "target", "prev", "next", "num_stages", "model", "train", "data_digest", "report", "update", "update_report", "auditor", "tolerance", "signature", "epoch", "tokens_digest", "attempt", "session", "target_device", "cross_device_tolerance", "also")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_REPORT_FIELD_NUMBER: _ClassVar[int]
    AUDITOR_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_DEVICE_FIELD_NUMBER: _ClassVar[int]
    CROSS_DEVICE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    ALSO_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    audit_id: int
    kind: AuditKind
    step: int
    stage: int
    micro_batch: int
    target: PeerInfo
    prev: PeerInfo
    next: PeerInfo
    num_stages: int
    model: ModelSpec
    train: TrainSpec
    data_digest: bytes
    report: StepReport
    update: ApplyUpdateRequest
    update_report: UpdateReport
    auditor: str
    tolerance: float
    signature: bytes
    epoch: int
    tokens_digest: bytes
    attempt: int
    session: bytes
    target_device: str
    cross_device_tolerance: float
    also: _containers.RepeatedCompositeFieldContainer[AuditItem]
    def __init__(self, run_id: _Optional[str] = ..., audit_id: _Optional[int] = ..., kind: _Optional[_Union[AuditKind, str]] = ..., step: _Optional[int] = ..., stage: _Optional[int] = ..., micro_batch: _Optional[int] = ..., target: _Optional[_Union[PeerInfo, _Mapping]] = ..., prev: _Optional[_Union[PeerInfo, _Mapping]] = ..., next: _Optional[_Union[PeerInfo, _Mapping]] = ..., num_stages: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., data_digest: _Optional[bytes] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., update: _Optional[_Union[ApplyUpdateRequest, _Mapping]] = ..., update_report: _Optional[_Union[UpdateReport, _Mapping]] = ..., auditor: _Optional[str] = ..., tolerance: _Optional[float] = ..., signature: _Optional[bytes] = ..., epoch: _Optional[int] = ..., tokens_digest: _Optional[bytes] = ..., attempt: _Optional[int] = ..., session: _Optional[bytes] = ..., target_device: _Optional[str] = ..., cross_device_tolerance: _Optional[float] = ..., also: _Optional[_Iterable[_Union[AuditItem, _Mapping]]] = ...) -> None: ...

class AuditItem(_message.Message):
    __slots__ = ("kind", "micro_batch")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    kind: AuditKind
    micro_batch: int
    def __init__(self, kind: _Optional[_Union[AuditKind, str]] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class AuditVerdict(_message.Message):
    __slots__ = ("run_id", "audit_id", "auditor", "verdict", "deviation", "detail", "signature", "attestation", "next_attestation", "commitments", "order_digest")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    AUDITOR_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DEVIATION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    ORDER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    audit_id: int
    auditor: str
    verdict: Verdict
    deviation: float
    detail: str
    signature: bytes
    attestation: StateAttestation
    next_attestation: StateAttestation
    commitments: _containers.RepeatedCompositeFieldContainer[TensorCommitment]
    order_digest: bytes
    def __init__(self, run_id: _Optional[str] = ..., audit_id: _Optional[int] = ..., auditor: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., deviation: _Optional[float] = ..., detail: _Optional[str] = ..., signature: _Optional[bytes] = ..., attestation: _Optional[_Union[StateAttestation, _Mapping]] = ..., next_attestation: _Optional[_Union[StateAttestation, _Mapping]] = ..., commitments: _Optional[_Iterable[_Union[TensorCommitment, _Mapping]]] = ..., order_digest: _Optional[bytes] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "stage", "completed_steps", "attestation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    stage: int
    completed_steps: int
    attestation: StateAttestation
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., stage: _Optional[int] = ..., completed_steps: _Optional[int] = ..., attestation: _Optional[_Union[StateAttestation, _Mapping]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("include_optimizer",)
    INCLUDE_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    include_optimizer: bool
    def __init__(self, include_optimizer: _Optional[bool] = ...) -> None: ...

class FetchDataRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("val_offset", "total_bytes", "data")
    VAL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    val_offset: int
    total_bytes: int
    data: bytes
    def __init__(self, val_offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("history",)
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    history: int
    def __init__(self, history: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "role", "stage", "heartbeat_age_s", "tensors_sent", "tensors_received", "tensors_rejected", "rejected_by_peers", "ban_reason", "audits_passed", "audits_failed", "audits_done", "distrusted", "build")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    TENSORS_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_PEERS_FIELD_NUMBER: _ClassVar[int]
    BAN_REASON_FIELD_NUMBER: _ClassVar[int]
    AUDITS_PASSED_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FAILED_FIELD_NUMBER: _ClassVar[int]
    AUDITS_DONE_FIELD_NUMBER: _ClassVar[int]
    DISTRUSTED_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    role: Role
    stage: int
    heartbeat_age_s: float
    tensors_sent: int
    tensors_received: int
    tensors_rejected: int
    rejected_by_peers: int
    ban_reason: str
    audits_passed: int
    audits_failed: int
    audits_done: int
    distrusted: str
    build: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., stage: _Optional[int] = ..., heartbeat_age_s: _Optional[float] = ..., tensors_sent: _Optional[int] = ..., tensors_received: _Optional[int] = ..., tensors_rejected: _Optional[int] = ..., rejected_by_peers: _Optional[int] = ..., ban_reason: _Optional[str] = ..., audits_passed: _Optional[int] = ..., audits_failed: _Optional[int] = ..., audits_done: _Optional[int] = ..., distrusted: _Optional[str] = ..., build: _Optional[str] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss", "tokens_per_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    tokens_per_s: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "time", "kind", "message", "node_id", "step", "type", "loss", "tokens_per_s", "grad_norm", "lr")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    kind: str
    message: str
    node_id: str
    step: int
    type: EventKind
    loss: float
    tokens_per_s: float
    grad_norm: float
    lr: float
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., node_id: _Optional[str] = ..., step: _Optional[int] = ..., type: _Optional[_Union[EventKind, str]] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., grad_norm: _Optional[float] = ..., lr: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "phase", "step", "total_steps", "num_stages", "nodes", "losses", "events", "coordinator_key_hex", "config_toml", "audits_total", "detections", "evidence", "model", "audit_rate", "max_audit_lag_steps", "audits_pending", "coordinator_key", "audit_wait_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_HEX_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    AUDITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIT_LAG_STEPS_FIELD_NUMBER: _ClassVar[int]
    AUDITS_PENDING_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    phase: RunPhase
    step: int
    total_steps: int
    num_stages: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    losses: _containers.RepeatedCompositeFieldContainer[LossPoint]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    coordinator_key_hex: str
    config_toml: str
    audits_total: int
    detections: int
    evidence: _containers.RepeatedScalarFieldContainer[str]
    model: ModelSpec
    audit_rate: float
    max_audit_lag_steps: int
    audits_pending: int
    coordinator_key: bytes
    audit_wait_s: float
    def __init__(self, run_id: _Optional[str] = ..., phase: _Optional[_Union[RunPhase, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., num_stages: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., losses: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., coordinator_key_hex: _Optional[str] = ..., config_toml: _Optional[str] = ..., audits_total: _Optional[int] = ..., detections: _Optional[int] = ..., evidence: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., audit_rate: _Optional[float] = ..., max_audit_lag_steps: _Optional[int] = ..., audits_pending: _Optional[int] = ..., coordinator_key: _Optional[bytes] = ..., audit_wait_s: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after_seq",)
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    def __init__(self, after_seq: _Optional[int] = ...) -> None: ...

class BanRequest(_message.Message):
    __slots__ = ("node_id", "reason", "operator")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    operator: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class UnbanRequest(_message.Message):
    __slots__ = ("node_id", "operator")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    operator: str
    def __init__(self, node_id: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("operator",)
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    operator: str
    def __init__(self, operator: _Optional[str] = ...) -> None: ...

class SetAuditRateRequest(_message.Message):
    __slots__ = ("rate", "operator")
    RATE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    rate: float
    operator: str
    def __init__(self, rate: _Optional[float] = ..., operator: _Optional[str] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("detail", "node_id", "phase", "step")
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    detail: str
    node_id: str
    phase: RunPhase
    step: int
    def __init__(self, detail: _Optional[str] = ..., node_id: _Optional[str] = ..., phase: _Optional[_Union[RunPhase, str]] = ..., step: _Optional[int] = ...) -> None: ...
