"""Wire messages shared by every agentjobs component, and their codecs.

Import from here: ``from schemas import IncidentEvent, decode_incident``.
"""

from .actions import ActionRecord, KillSwitch
from .alertmanager import AlertmanagerWebhook, to_incident
from .base import Phase, RiskClass, Severity, utcnow
from .control import ApproveAction, CancelInvestigation
from .credentials import CredentialsIssued
from .codec import KINDS, MAX_BODY_BYTES, WIRE_TYPES, WireMessage, decode, decode_incident, encode
from .deadletter import DeadLetter, ErrorKind, preview
from .errors import AgentJobsError, DecodeError, PermanentError, TemporaryError
from .feedback import OperatorFeedback, ShadowComparison, Verdict
from .finding import Conclusion, Cost, Evidence, Finding, Hypothesis, ProposedAction
from .identity import Identity, identify
from .incident import Alert, AlertStatus, IncidentEvent
from .lifecycle import AgentExit, AlertBrief, FailureReason, LifecycleEvent, LifecycleState
from .phase import PhaseChanged, PhasePin

__all__ = [
    "ActionRecord",
    "AgentExit",
    "AlertBrief",
    "KINDS",
    "MAX_BODY_BYTES",
    "WIRE_TYPES",
    "AgentJobsError",
    "Alert",
    "AlertStatus",
    "AlertmanagerWebhook",
    "ApproveAction",
    "CancelInvestigation",
    "Conclusion",
    "Cost",
    "CredentialsIssued",
    "DeadLetter",
    "DecodeError",
    "ErrorKind",
    "Evidence",
    "FailureReason",
    "Finding",
    "Hypothesis",
    "Identity",
    "KillSwitch",
    "IncidentEvent",
    "LifecycleEvent",
    "LifecycleState",
    "OperatorFeedback",
    "PermanentError",
    "Phase",
    "PhaseChanged",
    "PhasePin",
    "ProposedAction",
    "RiskClass",
    "Severity",
    "ShadowComparison",
    "TemporaryError",
    "Verdict",
    "WireMessage",
    "decode",
    "decode_incident",
    "encode",
    "identify",
    "preview",
    "to_incident",
    "utcnow",
]
