"""Labels without a person: the operator's rules and a judge model, written to the feedback topic."""
