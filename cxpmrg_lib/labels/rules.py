"""Phrase tables of the rule labeller: what names each observation, what vetoes a look-alike,
and which cues negate or hedge a mention.

Written for this project (not taken from the CheXpert labeler's phrase files). All
patterns are matched on normalised text: lower case, hyphens, slashes and underscores
turned into spaces, runs of spaces collapsed (see `labeler.normalise`). Each table
entry is a regular expression *fragment*; `labeler` compiles one alternation per
observation and kind, once, at import.

Three kinds of phrase per observation:
- MENTIONS: names the finding; its value comes from the cues around it (positive,
  negated, uncertain).
- HEDGED: names a sign that only suggests the finding (costophrenic blunting for an
  effusion, "borderline" heart size); uncertain unless negated.
- NORMAL: a statement that the structure is normal ("heart size is normal",
  "normal cardiomediastinal silhouette"); always negative.
VETOES are spans that look like a mention but are something else (pericardial
effusion, calcified nodule = granuloma, mass effect, bone lesion); a mention inside a
veto span is ignored.
"""
from __future__ import annotations

# Words allowed between a subject ("heart", "mediastinum") and its predicate without
# crossing into another clause. "(?:(?!X)[^.;,])" is a tempered token: any character
# except clause punctuation, and never the start of X.
def _tempered(stop: str, n: int) -> str:
    return rf"(?:(?!{stop})[^.;,]){{0,{n}}}?"


_NOT_NORMAL = r"enlarg|increas|promin|widen|borderline|\bbut\b|\bnot\b|\bexcept\b"
_NOT_ABNORMAL = r"\bnot\b|\bno\b|normal|\bbut\b|\bwithout\b"
_HEART = r"\b(?:heart|cardiac)(?: size| silhouette| shadow| contours?| diameter)?\b"
_CARDIOMED = r"\bcardio ?mediastinal(?: silhouette| contours?| shadow| size)?\b"
_MEDIAST = r"\b(?:mediastinum|mediastinal (?:silhouette|contours?|width|shadow|structures))\b"
_NORMAL_PRED = (r"(?:normal|within normal limits|unremarkable|not (?:significantly )?(?:enlarged|widened)"
                r"|upper limits? (?:of )?normal|top normal|(?:of )?normal size)\b")

MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"\b(?:widen(?:ed|ing)|enlarge(?:d|ment)|promin(?:ent|ence)) (?:of )?(?:the )?(?:superior )?(?:cardio ?)?mediastin(?:um|al(?: silhouette| contours?| width)?)\b",
        r"\b(?:cardio ?)?mediastin(?:um|al(?: silhouette| contours?| width| shadow)?)\b" + _tempered(_NOT_ABNORMAL, 40)
        + r"\b(?:widen(?:ed|ing)?|enlarged|prominent|increased)\b",
        r"\bwide(?:ned)? mediastinum\b",
        r"\benlarged cardiomediastinum\b",
    ],
    "Cardiomegaly": [
        r"\bcardiomegaly\b",
        r"\b(?:enlarged|large) (?:heart|cardiac (?:silhouette|shadow|size))\b",
        r"\b(?:enlargement|prominence) of the (?:heart|cardiac (?:silhouette|shadow))\b",
        r"\bcardiac enlargement\b",
        _HEART + _tempered(_NOT_ABNORMAL + r"|pericard|\bmediast", 40) + r"\b(?:enlarged|increased|large)\b",
    ],
    "Lung Opacity": [
        r"\bopaci(?:ty|ties|fication|fications|fied)\b",
        r"\binfiltrat(?:e|es|ion|ions|ive)\b",
        r"\bair ?space (?:disease|process|filling)\b",
        r"\bdensit(?:y|ies)\b",
        r"\bhaz(?:y|iness)\b(?! (?:opacit|densit|infiltrat|consolid))",
        r"\breticul(?:ar|ation|onodular)\b",
        r"\binterstitial (?:markings?|opacit\w*|prominence|pattern|thickening|lung disease|disease|changes?|process)\b",
        r"\bincreased (?:lung |pulmonary |interstitial )markings\b",
        r"\bscar(?:s|ring|red)?\b",
        r"\bfibro(?:sis|tic)\b",
    ],
    "Lung Lesion": [
        r"\bnodul(?:e|es|ar|arity|arities)\b",
        r"\bmass(?:es)?\b",
        r"\blesions?\b",
        r"\btumou?rs?\b",
        r"\bneoplas(?:m|ms|tic)\b",
        r"\b(?:carcinoma|cancer|malignan(?:cy|t))\b",
        r"\bmetasta(?:sis|ses|tic)\b",
    ],
    "Edema": [
        r"\b(?:o)?edema(?:tous)?\b",
        r"\b(?:vascular|venous|pulmonary) congestion\b",
        r"\bcongestive\b",
        r"\bchf\b",
        r"\bheart failure\b",
        r"\b(?:fluid|volume) overload\b",
        r"\bkerley\b",
        r"\bcephali[sz]ation\b",
        r"\bcongest(?:ion|ed)\b",
        r"\bvascular (?:prominence|engorgement|indistinctness)\b",
        r"\b(?:increased|prominent) (?:pulmonary |lung |interstitial )?vascular(?:ity|ature| markings)\b",
        r"\b(?:pulmonary |lung )?vascular(?:ity|ature) (?:is |are )?(?:mildly |moderately |slightly )?(?:increased|prominent|engorged|congested|indistinct)\b",
    ],
    "Consolidation": [
        r"\bconsolidat(?:ion|ions|ive|ed|ing)\b",
    ],
    "Pneumonia": [
        r"\b(?:broncho)?pneumonias?\b",
        r"\bpneumonitis\b",
        r"\binfect(?:ion|ions|ious|ive)\b",
    ],
    "Atelectasis": [
        r"\batelecta(?:sis|ses|tic)\b",
        r"\b(?:lobar|lobe|lung|segmental) collapse\b",
        r"\bcollapse(?:d)? (?:of )?(?:the )?(?:\w+ ){0,2}(?:lobe|lung)\b",
    ],
    "Pneumothorax": [
        r"\b(?:hydro|hemo|haemo)?pneumothora(?:x|ces|xes)\b",
        r"\bptx\b",
    ],
    "Pleural Effusion": [
        r"\beffusions?\b",
        r"\bpleural fluid\b",
        r"\b(?:hydro|hemo|haemo)thorax\b",
        r"\bhydropneumothora(?:x|ces)\b",
        r"\bfluid (?:in|within) the (?:\w+ )?(?:pleural|fissure)",
    ],
    "Pleural Other": [
        r"\bpleural (?:thickening|plaques?|scar(?:ring|s)?|calcifications?|reaction|fibrosis)\b",
        r"\b(?:thickening|scarring|calcification) of the pleura\b",
        r"\bfibrothorax\b",
        r"\bapical (?:pleural )?(?:cap|caps|capping|thickening)\b",
        r"\bpleural capping\b",
        r"\bfissural thickening\b|\bthickening of the (?:\w+ ){0,2}fissures?\b|\bthickened (?:\w+ )?fissures?\b",
        r"\bpleuro ?parenchymal (?:scar\w*|thickening|changes?)\b",
        r"\bcalcified (?:pleural )?plaques?\b",
    ],
    "Fracture": [
        r"\bfractur(?:e|es|ed|ing)\b",
        r"\bfx\b",
    ],
    "Support Devices": [
        r"\b(?:endotracheal|et|tracheostomy|trach|chest|nasogastric|ng|orogastric|og|feeding|enteric|gastric"
        r"|gastrostomy|thoracostomy|pigtail|drainage|dobb?hoff|mediastinal|nasoenteric|sengstaken) tubes?\b",
        r"\b(?:ett|ngt|ogt|picc|cvc|aicd|icd|iabp|lvad|tavr|tavi)\b",
        r"\b(?:picc|central|venous|subclavian|jugular|ij|arterial|dialysis|hemodialysis|hickman|swan ganz|"
        r"pulmonary artery|tunn?el(?:l)?ed|port) (?:line|lines|catheters?)\b",
        r"\bcatheters?\b",
        r"\bport a cath\b|\bportacath\b|\bmediport\b|\bpower port\b|\bchest port\b|\bport catheter\b",
        r"\bpace(?:maker|makers|r)\b",
        r"\bdefibrillators?\b",
        r"\b(?:pacing|pacer|pacemaker|transvenous|cardiac|icd|aicd|epicardial) (?:wires?|leads?)\b",
        r"\bleads? (?:terminat\w*|project\w*|in (?:the )?(?:right|expected|standard))\b",
        r"\b(?:valve (?:replacement|prosthesis)|prosthetic (?:aortic |mitral )?valve|mechanical valve|valvuloplasty ring|annuloplasty ring)\b",
        r"\bstents?\b",
        r"\bdrains?\b",
        r"\bshunt(?: tubing| catheter)?\b",
        r"\b(?:balloon pump|ventricular assist device|impella|loop recorder|closure device|cardiac device)\b",
        r"\b(?:sternotomy|sternal) wires?\b",
        r"\b(?:monitor|monitoring|ekg|ecg|telemetry|electrocardiogram) leads\b|\bleads\b",
        r"\b(?:ivc|vena cava) filter\b|\bgenerator\b|\belectronic device\b|\bprosthetic (?:pulmonic|tricuspid) valve\b",
        r"\btip (?:projects?|projecting|terminat\w*|overl\w*|is (?:in|at) the)\b",
        r"\bsupport devices?\b|\btubes and lines\b|\blines and tubes\b|\bmonitoring devices\b",
    ],
}

HEDGED: dict[str, list[str]] = {
    "Pleural Effusion": [
        r"\bblunt(?:ing|ed)? (?:of )?(?:the )?(?:\w+ )?(?:\w+ )?costophrenic\b",
        r"\bcostophrenic (?:angles? |sulci |sulcus |recess(?:es)? |xxxx )?(?:(?:is|are|remain|remains|appear) )?(?:\w+ )?blunt(?:ed|ing)\b",
    ],
    "Cardiomegaly": [
        r"\bborderline (?:cardiomegaly|heart size|cardiac (?:size|silhouette|enlargement)|enlarge(?:d|ment)(?: of the)? (?:heart|cardiac silhouette))\b",
        _HEART + r" (?:(?:is|appears?|remains?) )?(?:at )?(?:the )?borderline\b",
    ],
    "Enlarged Cardiomediastinum": [
        r"\bborderline (?:widen(?:ed|ing)|enlarge(?:d|ment)) (?:of )?(?:the )?mediastin\w*",
    ],
}

NORMAL: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"(?:" + _CARDIOMED + "|" + _MEDIAST + r"|\bheart and mediastinum)" + _tempered(_NOT_NORMAL, 60) + r"\b" + _NORMAL_PRED,
        r"\bnormal (?:(?:size|sized|appearing) )?(?:cardio ?mediastin\w*|mediastin\w*)",
        r"\b(?:mediastinum|mediastinal contours?) (?:is |are )?(?:\w+ )?midline\b(?=[^.;]*normal)",
    ],
    "Cardiomegaly": [
        r"(?:" + _HEART + "|" + _CARDIOMED + r")" + _tempered(_NOT_NORMAL + r"|pericard|vascular|vessel|\blungs?\b", 60) + r"\b" + _NORMAL_PRED,
        r"\bnormal (?:(?:size|sized|appearing) )?(?:heart|cardiac|cardio ?mediastin)\w*",
        r"\bheart (?:is )?normal in size\b",
    ],
    "Lung Opacity": [
        # "lungs are clear" = no opacity; see labeler module docstring.
        r"\b(?:lungs?|lung fields?|lung parenchyma|lung bases|lungs bilaterally)\b" + _tempered(r"\bexcept\b|\bno\b|\bnot\b", 40) + r"\bclear\b",
        r"\bclear (?:lungs?|lung fields?)\b",
        r"\blungs? (?:are |is )?(?:otherwise )?(?:normal|unremarkable)\b",
    ],
    "Pleural Effusion": [
        r"\bcostophrenic (?:angles? |sulci |recess(?:es)? |xxxx )?(?:(?:is|are|remain|appear) )?(?:\w+ )?(?:sharp|preserved|clear)\b",
        r"\bsharp costophrenic\b",
    ],
}

VETOES: dict[str, list[str]] = {
    "Pleural Effusion": [r"\bpericardial (?:fluid|effusions?)\b", r"\b(?:joint|knee|shoulder|pericardial) effusions?\b",
                         r"\bno pericardial or pleural effusion"],
    "Lung Lesion": [r"\bcalcified (?:granulomas?|nodul\w*|lesions?)\b", r"\bgranulomatous nodul\w*",
                    r"\bmass effect\b", r"\b(?:bone|bony|osseous|lytic|blastic|sclerotic|skin|cutaneous|breast|osteolytic) (?:lesions?|mass(?:es)?)\b",
                    r"\bsoft tissue (?:mass|nodul\w*)\b", r"\bchest wall (?:mass|lesion)\b",
                    r"\blesions? (?:of|in|involving|within) the (?:\w+ ){0,4}(?:ribs?|humer\w*|clavicles?|spine|vertebra\w*|scapula\w*|sternum|bones?|shoulders?)\b", r"\bnipple\b", r"\b(?:body|muscle) mass\b"],
    "Edema": [r"\b(?:soft tissue|subcutaneous|extremity|facial|scalp) (?:o)?edema\b", r"\b(?:nasal|sinus) congestion\b"],
    "Lung Opacity": [r"\b(?:bone|bony|breast|soft tissue|calcified|metallic|osseous|mineral) densit(?:y|ies)\b",
                     r"\bpleural (?:scar\w*|fibrosis)\b", r"\bdensit(?:y|ies) (?:of|in) the (?:bones?|spine|vertebra\w*)\b",
                     r"\bscar(?:s|ring)? (?:from|of|at|in) the (?:sternotomy|incision|chest wall|skin)\b",
                     r"\bsternotomy scar\b", r"\bsurgical scar\b", r"\bopacity of the (?:bones?|soft tissues?)\b"],
    "Pneumonia": [r"\binfect(?:ion|ious) (?:control|disease service|history)\b",
                  r"\bgranulomatous (?:\w+ )?infections?\b",
                  r"\b(?:old|prior|previous|remote|healed|chronic|sequelae? of) (?:\w+ ){0,2}infections?\b",
                  r"\b(?:signs?|symptoms?|history) of (?:\w+ )?infections?\b"],
    "Support Devices": [r"\burinary catheter\b", r"\bstent(?:s)? (?:in|of) the (?:biliary|ureter)\w*"],
    "Atelectasis": [],
}

# Cues. Negation cues govern the words after them in their clause (PRE) or the mention
# just before them (POST); uncertainty likewise.
NEG_PRE = [
    r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnor\b", r"\bneither\b", r"\babsen(?:t|ce) of\b",
    r"\bfree of\b", r"\bclear of\b", r"\bnegative for\b", r"\bnegative\b(?= \w+ (?:for|of)\b)",
    r"\bresolved\b", r"\bresolution of\b", r"\b(?:removal|withdrawal|clearing|discontinuation) of\b",
    r"\bremoved\b", r"\bruled out\b", r"\brather than\b", r"\bno longer\b",
    r"\bfailed to (?:show|demonstrate|reveal)\b", r"\bdoes not (?:show|demonstrate|reveal)\b",
]
NEG_POST = [
    r"\b(?:has|have|had) (?:since |now |completely |nearly |almost |largely )?(?:resolved|cleared|been removed|been withdrawn|been discontinued|been pulled)\b",
    r"\b(?:is|are|was|were) (?:now )?(?:resolved|removed|absent|gone)\b",
    r"\bresolved\b", r"\bremoved\b",
    r"\b(?:is|are|was|were|has been|have been)? ?(?:not|no longer) (?:\w+ )?(?:seen|identified|present|visuali[sz]ed|appreciated|demonstrated|evident|noted|detected|apparent|visible)\b",
    r"\bnot (?:seen|identified|present|visuali[sz]ed|appreciated|demonstrated|evident|noted|detected|apparent|visible)\b",
]
UNC_PRE = [
    r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossib(?:le|ly|ility)\b", r"\bprobab(?:le|ly)\b", r"\b(?:un)?likely\b",
    r"\bsuspect(?:ed|s)?\b", r"\bsuspicio(?:n|us)\b", r"\bconcern(?:ing|s)?\b", r"\bworrisome\b", r"\bquestion(?:able|ed|s)?\b",
    r"\bconsider(?:ed|ation)?\b", r"\bsuggest(?:s|ed|ing|ive)?\b", r"\bversus\b", r"\bvs\b", r"\bdifferential\b",
    r"\bpresum(?:ed|ably|ptive)\b", r"\bperhaps\b", r"\bequivocal\b", r"\bindeterminate\b", r"\buncertain\b",
    r"\bborderline\b", r"\bfavou?r(?:ed|s)?\b", r"\bcan ?not (?:be )?(?:entirely |completely )?(?:exclude[ds]?|ruled? out)\b",
    r"\bnot (?:be )?(?:entirely |completely )?(?:excluded|ruled out)\b", r"\bdo not exclude\b", r"\brule out\b", r"\br o\b",
    r"\band or\b", r"\bor less likely\b", r"\bthought to (?:be|represent)\b", r"\bcannot\b", r"\bnot exclude\b",
]
UNC_POST = [
    r"\b(?:is|are|was|were)?\s?(?:not|cannot be|can not be) (?:entirely |completely )?(?:excluded|ruled out)\b",
    r"\b(?:is|are) (?:also )?(?:possible|suspected|questioned|likely|probable|favou?red|considered|not excluded|a consideration|questionable)\b",
    r"\b(?:versus|vs)\b", r"\bor less likely\b", r"\band or\b", r"\bcould be\b", r"\bmay be (?:present|seen)\b",
]
# "no change in the effusion" is not a negation of the effusion.
PSEUDO_NEG = [
    r"\bno (?:significant |appreciable |substantial |interval |definite |other )?(?:change|changes|increase|decrease|worsening|progression|improvement|difference)\b",
    r"\bnot (?:significantly |appreciably )?(?:changed|increased|decreased|worsened|improved|only)\b",
    r"\bwithout (?:significant |interval )?change\b", r"\bgram negative\b", r"\bno longer\b(?= (?:than|as))",
]
# Where a negation's scope ends inside a sentence.
SCOPE_BREAK = [
    r"\b(?:but|however|although|though|whereas|yet|except|aside from|apart from|other than|besides|otherwise|while)\b",
    r"[;:]",
    r"\band (?:interval )?(?=(?:placement|insertion|there|a|an|small|mild|moderate|large|minimal|trace|possible|probable|likely|may|new|the heart|the lungs?)\b)",
]
# A comma that starts a new statement (", small effusion") also ends a negation's scope,
# unless the clause goes on as a list ("no consolidation, large effusion, or pneumothorax").
COMMA_BREAK = [
    r",(?! ?(?:and|or|nor)\b)(?= ?(?:there|small|mild|moderate|large|severe|minimal|trace|tiny|new|increased|increasing|persistent"
    r"|stable|unchanged|possibl\w*|probabl\w*|likely|may|might|could|cannot|suspect\w*|question\w*|consider\w*|suggest\w*"
    r"|borderline|subtle|which|with|left|right|bilateral|patchy|focal|linear|streaky|mildly|moderately|markedly|the|a|an"
    r"|this|these|it|heart|cardiac|lungs?|degenerative|calcified|status|postoperative|again|interval|redemonstrat\w*|findings?)\b)",
]

# Substrings of which at least one occurs in every phrase of an observation (MENTIONS,
# HEDGED, NORMAL). The labeller runs an observation's regex only on text that holds
# one of them: a plain substring test is ~100x cheaper than a regex scan. A test
# checks that the labels are the same with and without this shortcut.
TRIGGERS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("mediastin",),
    "Cardiomegaly": ("cardi", "heart"),
    "Lung Opacity": ("opaci", "infiltrat", "air", "densit", "haz", "reticul", "interstitial", "markings", "scar",
                     "fibro", "lung"),
    "Lung Lesion": ("nodul", "mass", "lesion", "tumo", "neoplas", "carcinoma", "cancer", "malignan", "metasta"),
    "Edema": ("edema", "congest", "chf", "heart failure", "overload", "kerley", "cephali", "vascula"),
    "Consolidat": ("consolidat",),
    "Pneumonia": ("pneumon", "infect"),
    "Atelectasis": ("atelecta", "collapse"),
    "Pneumothorax": ("pneumothora", "ptx"),
    "Pleural Effusion": ("effusion", "pleural fluid", "thorax", "fluid", "costophrenic"),
    "Pleural Other": ("pleura", "fibrothorax", "apical", "fissur", "plaque"),
    "Fracture": ("fractur", "fx"),
    "Support Devices": ("tube", "ett", "ngt", "ogt", "picc", "cvc", "icd", "iabp", "lvad", "tav", "line", "cath",
                        "port", "pace", "defibrillator", "lead", "valve", "ring", "stent", "drain", "shunt", "pump",
                        "device", "impella", "recorder", "wire", "filter", "generator", "tip "),
}
TRIGGERS["Consolidation"] = TRIGGERS.pop("Consolidat")
