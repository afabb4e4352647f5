"""The 14 CheXpert observations read from report text: the rule labeller (labeler, with its phrase
tables in rules), the optional CheXbert backend (chexbert) and IU X-Ray's MeSH terms (mesh)."""
