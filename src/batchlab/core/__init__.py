"""Pure math: scaling rules, schedules, noise-scale estimators, fits. numpy and stdlib only."""
