"""Privacy accounting lives here (DP-SGD, ledger, audit): see the differential-privacy issue."""
