"""The DICOM PS3.15 tables that :mod:`emma.io.deid` applies: data, not code.

Annex E's Basic Application Confidentiality Profile (Table E.1-1) by action, the options EMMA implements
(Retain Patient Characteristics, Retain Safe Private, Modified Dates), the UI keywords that name classes
rather than instances, and the coded values written into the de-identified header.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class Action(StrEnum):
    """Annex E action codes."""

    DUMMY = "D"  # replace with a non-empty dummy value (here: a keyed pseudonym)
    ZERO = "Z"  # replace with a zero-length value
    REMOVE = "X"  # remove the element
    KEEP = "K"  # keep as is (sequences are still cleaned inside)
    UID = "U"  # replace a UID by a consistent keyed one


# Descriptive free text: removed by default, kept with ``keep_descriptions`` (it may still hold PHI typed
# by a person: review before release).
DESCRIPTOR_KEYWORDS: frozenset[str] = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
        "ScheduledProcedureStepDescription",
        "DerivationDescription",
        "AcquisitionDeviceProcessingDescription",
        "ContrastBolusAgent",
    }
)

# Annex E "Retain Patient Characteristics Option": kept with ``keep_patient_characteristics``.
PATIENT_CHARACTERISTIC_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "SmokingStatus",
        "PregnancyStatus",
        "PatientSexNeutered",
    }
)

# The Annex E table (PS3.15 Table E.1-1, Basic Profile column), by action. Dates and times that Annex E
# marks Z/X/D are shifted instead (Retain Longitudinal Temporal Information with Modified Dates option).
_DUMMY_KEYWORDS = ("PatientName", "PatientID")  # keyed pseudonyms (see module doc)

_ZERO_KEYWORDS = (
    "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ContrastBolusAgent",
    "ReferringPhysicianName",
)  # fmt: skip

_REMOVE_KEYWORDS = (
    # patient identity and demographics
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID", "PatientBirthTime",
    "PatientBirthName", "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientAge", "PatientSize", "PatientWeight", "PatientSexNeutered",
    "EthnicGroup", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientMotherBirthName",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "MedicalAlerts", "Allergies", "CountryOfResidence", "RegionOfResidence",
    "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference",
    "PatientState", "SpecialNeeds", "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "ReferencedPatientSequence", "ReferencedPatientAliasSequence",
    "ReferencedPatientPhotoSequence", "PatientInstitutionResidence", "CurrentPatientLocation",
    "ConfidentialityConstraintOnPatientDataDescription",
    # visit, admission, order, request, procedure step
    "AdmissionID", "IssuerOfAdmissionIDSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "AdmittingDate", "AdmittingTime", "RouteOfAdmissions",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "VisitComments",
    "IssuerOfAccessionNumberSequence", "StudyComments", "RequestedProcedureID", "RequestedProcedureComments",
    "ReasonForTheRequestedProcedure", "ReasonForStudy", "RequestingService", "RequestedContrastAgent",
    "RequestAttributesSequence", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "OrderEnteredBy", "OrderEntererLocation",
    "OrderCallbackPhoneNumber", "OrderCallbackTelecomInformation", "ImagingServiceRequestComments",
    "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence", "PerformedProcedureStepID",
    "PerformedStationName", "PerformedLocation", "PerformedStationAETitle",
    "CommentsOnThePerformedProcedureStep", "ScheduledStationName", "ScheduledStationAETitle",
    "ScheduledProcedureStepLocation", "ScheduledProcedureStepID",
    # descriptions (kept with keep_descriptions) and free-text comments (always removed)
    "StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "ScheduledProcedureStepDescription", "DerivationDescription",
    "AcquisitionDeviceProcessingDescription", "AcquisitionComments", "ImageComments", "FrameComments",
    "IdentifyingComments", "TextValue",
    # people other than the patient
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "RequestingPhysician",
    "RequestingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledPerformingPhysicianIdentificationSequence", "NamesOfIntendedRecipientsOfResults",
    "IntendedRecipientsOfResultsIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "ReviewerName", "HumanPerformerName", "HumanPerformerOrganization", "PersonAddress",
    "PersonTelephoneNumbers", "PersonTelecomInformation", "PersonIdentificationCodeSequence",
    "VerifyingOrganization", "AuthorObserverSequence", "ParticipantSequence",
    "CustodialOrganizationSequence",
    # institution and equipment
    "InstitutionName", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "StationName", "DeviceSerialNumber", "DeviceID",
    "DetectorID", "GantryID", "GeneratorID", "CassetteID", "PlateID", "UniqueDeviceIdentifier",
    "UDISequence", "StationAETitle", "RetrieveAETitle", "TimezoneOffsetFromUTC",
    # containers that can carry anything
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "DigitalSignaturesSequence",
    "MACParametersSequence", "EncryptedAttributesSequence", "IconImageSequence", "DataSetTrailingPadding",
)  # fmt: skip

# Instance UIDs that Annex E names; every other UI value outside the DICOM registry is remapped too.
_UID_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "ReferencedSOPInstanceUID", "ReferencedFrameOfReferenceUID", "SynchronizationFrameOfReferenceUID",
    "InstanceCreatorUID", "DeviceUID", "IrradiationEventUID", "DimensionOrganizationUID",
    "ConcatenationUID", "StorageMediaFileSetUID", "TransactionUID", "FailedSOPInstanceUIDList", "UID",
)  # fmt: skip

# Rewritten at the end by the de-identification itself.
_KEEP_KEYWORDS = (
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)  # fmt: skip

BASIC_PROFILE: Mapping[str, Action] = MappingProxyType(
    {
        keyword: action
        for keywords, action in (
            (_DUMMY_KEYWORDS, Action.DUMMY),
            (_ZERO_KEYWORDS, Action.ZERO),
            (_REMOVE_KEYWORDS, Action.REMOVE),
            (_UID_KEYWORDS, Action.UID),
            (_KEEP_KEYWORDS, Action.KEEP),
        )
        for keyword in keywords
    }
)
"""Annex E actions by keyword (basic profile, before the ``keep_*`` options)."""

# UI elements that name a class, syntax or scheme rather than an instance: never remapped.
CLASS_UID_KEYWORDS: frozenset[str] = frozenset(
    {
        "SOPClassUID",
        "MediaStorageSOPClassUID",
        "ReferencedSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "ReferencedRelatedGeneralSOPClassUIDInFile",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "SOPClassesInStudy",
        "TransferSyntaxUID",
        "ReferencedTransferSyntaxUIDInFile",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
        "ContextGroupExtensionCreatorUID",
        "TemplateExtensionOrganizationUID",
        "TemplateExtensionCreatorUID",
        "PrivateRecordUID",
    }
)

# Modalities whose pixels often carry burned-in text (PS3.15 E.1.1 guidance).
BURNED_IN_RISK_MODALITIES: frozenset[str] = frozenset({"US", "SC", "OT", "XC", "ES"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float/DoubleFloat/PixelData

# Retain Safe Private Option: (group, private creator) -> element offsets kept (see the module doc).
SAFE_PRIVATE: Mapping[tuple[int, str], frozenset[int]] = MappingProxyType(
    {
        # Siemens CSA image header type and info (NumberOfImagesInMosaic, SliceNormalVector, ...)
        (0x0029, "SIEMENS CSA HEADER"): frozenset({0x08, 0x10}),
    }
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# File meta elements that identify the sending site or carry private information.
FILE_META_REMOVE: tuple[int, ...] = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)

CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")
