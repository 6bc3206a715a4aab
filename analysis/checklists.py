"""The reporting checklists a journal asks for, mapped to where the study report (or the run folder) answers them.

TRIPOD+AI (Collins et al., BMJ 2024;385:e078378) for a prediction model developed and evaluated across centres, and
the imaging items of CLAIM 2024 (Tejani et al., Radiol Artif Intell 2024;6(4):e240300). Topics are paraphrased
(see the published checklists for the full wording). Each item is answered in a section of the report (an anchor,
``#...``), in a file of the run folder or the documentation, or it is left for the authors: what the software cannot
know (ethics approval, funding, eligibility criteria, who annotated the images) is marked so, never claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

REPORT = "report"  # answered in a section of this report
FOLDER = "run folder"  # answered by a file of the run folder or the documentation
PARTLY = "partly"  # the report gives what the software knows; the authors complete it
AUTHORS = "authors"  # the software cannot know it: for the authors


@dataclass(frozen=True)
class Item:
    """One checklist item: its number, topic (paraphrased), status, where it is answered and what remains."""

    item: str
    topic: str
    status: str
    where: str = ""  # "#section" of the report, or a path in the run folder or the repository
    note: str = ""


SECTIONS = {
    "#question": "1. Cohort", "#training": "2. Training", "#comparison": "3. Model comparison", "#calibration": "4. Calibration",
    "#heterogeneity": "5. Heterogeneity across centres", "#subgroups": "6. Subgroups", "#samplesize": "7. Sample size",
    "#survival": "8. Survival", "#radiogenomics": "9. Radiogenomics", "#privacy": "10. Privacy", "#modelcard": "11. Model card",
    "#checklists": "12. Reporting checklists", "#software": "13. Software",
}  # fmt: skip

TRIPOD_AI: tuple[Item, ...] = (
    Item("1", "Title: development or evaluation of a prediction model, population, outcome", AUTHORS, "", "the manuscript's title"),
    Item("2", "Abstract (TRIPOD+AI for Abstracts)", AUTHORS),
    Item("3a", "Healthcare context, rationale, existing models", PARTLY, "#question", "references to existing models"),
    Item("3b", "Target population, intended purpose in the care pathway, intended users", REPORT, "#modelcard"),
    Item("3c", "Known health inequalities between sociodemographic groups", AUTHORS),
    Item("4", "Objectives: development and/or validation", REPORT, "#question"),
    Item("5a", "Data sources for development and evaluation; representativeness", PARTLY, "#question", "source type and representativeness"),
    Item("5b", "Dates of participant accrual and follow-up", AUTHORS, "", "manifests carry no dates"),
    Item("6a", "Setting; number and location of centres", PARTLY, "#question", "the centres' location and level of care"),
    Item("6b", "Eligibility criteria", AUTHORS),
    Item("6c", "Treatments received and how they were handled", PARTLY, "#subgroups", "TACE technique by subgroup; treatment protocols"),
    Item("7", "Data pre-processing and quality checking", REPORT, "#training", "every site ran `tace-client check`; docs/preprocessing.md"),
    Item("8a", "Outcome definition, time horizon, how and when assessed", PARTLY, "#question", "when response was assessed"),
    Item("8b", "Qualifications of outcome assessors (if subjective)", AUTHORS),
    Item("8c", "Blinding of outcome assessment", AUTHORS),
    Item("9a", "Choice of initial predictors", PARTLY, "#training", "the rationale for the clinical factors"),
    Item("9b", "Definition and measurement of all predictors", FOLDER, "docs/manifest.md", "every manifest column with its unit"),
    Item("9c", "Qualifications of predictor assessors (tumour segmentation)", AUTHORS),
    Item("10", "Study size and its justification", REPORT, "#samplesize"),
    Item("11", "Handling of missing data", FOLDER, "clinical_encoder.json", "missing clinical factors imputed with the pooled mean or mode"),
    Item("12a", "How the data were used; partitioning", REPORT, "#question"),
    Item("12b", "Handling of predictors (transformation, standardisation)", FOLDER, "clinical_encoder.json", "docs/preprocessing.md for images"),
    Item("12c", "Model type, building steps, tuning, internal validation", REPORT, "#training"),
    Item("12d", "Heterogeneity across clusters (TRIPOD-Cluster)", REPORT, "#heterogeneity"),
    Item("12e", "Performance measures and plots, and their rationale", REPORT, "#comparison", "docs/analysis.md names each statistic"),
    Item("12f", "Model updating (recalibration) after evaluation", PARTLY, "#comparison", "local fine-tuning when run; no recalibration"),
    Item("12g", "How predictions were calculated in the evaluation", REPORT, "#modelcard", "the model file models/tace-model.zip"),
    Item("13", "Class imbalance methods", REPORT, "#training", "none: unweighted cross-entropy, no resampling"),
    Item("14", "Approaches to model fairness", PARTLY, "#subgroups", "performance by subgroup; the authors' rationale"),
    Item("15", "Model output; thresholds and how they were identified", REPORT, "#comparison", "cut-offs.json: Youden on the training sites"),
    Item("16", "Differences between development and evaluation data", PARTLY, "#question", "setting, eligibility and outcome assessment"),
    Item("17", "Ethics approval and consent", AUTHORS),
    Item("18a", "Funding", AUTHORS),
    Item("18b", "Conflicts of interest", AUTHORS),
    Item("18c", "Protocol", AUTHORS),
    Item("18d", "Registration", AUTHORS),
    Item("18e", "Data availability", PARTLY, "#privacy", "what left each site; how others may access the data"),
    Item("18f", "Code availability", PARTLY, "#software", "TACE-FL version; the repository's address"),
    Item("19", "Patient and public involvement", AUTHORS),
    Item("20a", "Flow of participants; with and without the outcome; follow-up", PARTLY, "#question", "exclusions before the manifests"),
    Item("20b", "Characteristics overall and per source", PARTLY, "#subgroups", "external sites' case mix; the sites' cohort summaries"),
    Item("20c", "Predictor distributions: development vs evaluation data", AUTHORS, "", "the sites' `tace-client check` cohort summaries"),
    Item("21", "Participants and events in each analysis", REPORT, "#question"),
    Item("22", "Full model specification for predictions in new individuals", FOLDER, "models/tace-model.zip", "with its model card"),
    Item("23a", "Performance with CIs, including key subgroups", REPORT, "#comparison", "and #calibration, #subgroups"),
    Item("23b", "Heterogeneity of performance across clusters", REPORT, "#heterogeneity"),
    Item("24", "Results of any model updating", PARTLY, "#comparison", "local fine-tuning when run"),
    Item("25", "Interpretation, including fairness", AUTHORS),
    Item("26", "Limitations", PARTLY, "#modelcard", "the limits the software can see are listed"),
    Item("27a", "Handling poor-quality or missing inputs in use", REPORT, "#modelcard", "docs/prediction.md"),
    Item("27b", "User interaction and expertise required", PARTLY, "#modelcard"),
    Item("27c", "Next steps for research", AUTHORS),
)  # fmt: skip

CLAIM_2024: tuple[Item, ...] = (
    Item("1", "Identification as an AI study, technology category", AUTHORS, "", "the title (deep learning: 3D CNN and MLP)"),
    Item("2", "Structured summary", AUTHORS),
    Item("3", "Background; intended use and role of the AI", PARTLY, "#modelcard"),
    Item("4", "Aims, objectives, hypotheses", PARTLY, "#question"),
    Item("5", "Prospective or retrospective", AUTHORS),
    Item("6", "Study goal", REPORT, "#question", "model creation and external testing"),
    Item("7", "Data sources", PARTLY, "#question"),
    Item("8", "Inclusion and exclusion criteria", AUTHORS),
    Item("9", "Data pre-processing", REPORT, "#training", "docs/preprocessing.md; run_config.json"),
    Item("10", "Selection of data subsets", REPORT, "#question"),
    Item("11", "De-identification", PARTLY, "#privacy", "pseudonymised manifests at each site"),
    Item("12", "Handling of missing data", FOLDER, "clinical_encoder.json"),
    Item("13", "Image acquisition protocol", AUTHORS, "", "field strength and vendor subgroups when the manifests carry them"),
    Item("14", "Definition of the reference standard", REPORT, "#question", "mRECIST objective response"),
    Item("15", "Rationale for the reference standard", AUTHORS),
    Item("16", "Source of reference standard annotations", AUTHORS),
    Item("17", "Annotation of the test set (tumour masks)", AUTHORS),
    Item("18", "Inter- and intra-rater variability", AUTHORS),
    Item("19", "Assignment of data to partitions", REPORT, "#question", "split column at training sites; whole external sites"),
    Item("20", "Level at which partitions are disjoint", REPORT, "#question", "patient within a site; site for external testing"),
    Item("21", "Intended sample size", REPORT, "#samplesize"),
    Item("22", "Detailed model description", REPORT, "#training", "docs/training.md"),
    Item("23", "Software libraries, frameworks, packages", REPORT, "#software"),
    Item("24", "Initialisation of model parameters", REPORT, "#training", "random initialisation from the run's seed"),
    Item("25", "Training approach", REPORT, "#training"),
    Item("26", "Method of selecting the final model", REPORT, "#training", "best pooled internal-validation AUC"),
    Item("27", "Ensembling", REPORT, "#training", "none"),
    Item("28", "Metrics of model performance", REPORT, "#comparison"),
    Item("29", "Statistical significance and uncertainty", REPORT, "#comparison", "DeLong CIs and tests; #heterogeneity"),
    Item("30", "Robustness or sensitivity analysis", PARTLY, "#heterogeneity", "across centres and #subgroups"),
    Item("31", "Explainability methods and their validation", PARTLY, "#modelcard", "saliency maps in the patient cards (docs/prediction.md)"),
    Item("32", "Evaluation on internal data", REPORT, "#comparison"),
    Item("33", "Testing on external data", REPORT, "#comparison"),
    Item("34", "Clinical trial registration", AUTHORS),
    Item("35", "Patients included and excluded", PARTLY, "#question", "exclusions before the manifests"),
    Item("36", "Demographic and clinical characteristics per partition", PARTLY, "#subgroups", "external sites"),
    Item("37", "Performance metrics with statistical uncertainty", REPORT, "#comparison", "and #calibration"),
    Item("38", "Diagnostic performance and its precision", REPORT, "#comparison", "at the cut-off fixed on the training sites"),
    Item("39", "Failure analysis", PARTLY, "#subgroups", "where the models do and do not work"),
    Item("40", "Limitations", PARTLY, "#modelcard"),
    Item("41", "Implications for practice, intended use", PARTLY, "#modelcard"),
    Item("42", "Study protocol or technical details", FOLDER, "run_config.json", "and docs/"),
    Item("43", "Availability of software, model, data", PARTLY, "#software", "the model file models/tace-model.zip"),
    Item("44", "Funding and role of funders", AUTHORS),
)  # fmt: skip

STATUS_WORDS = {REPORT: "answered in this report", FOLDER: "in the run folder / documentation", PARTLY: "partly: authors complete",
                AUTHORS: "for the authors"}  # fmt: skip
