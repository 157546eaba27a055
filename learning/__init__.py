"""The learning layer, the learner's side: question banks, the offline grader, spoken briefs built from
the learner's own runs, the FSRS progress database, the 14-day roadmap with level checkpoints, and
smoke reports. It reads modules through the platform's registry (core/) and never imports a module's
code or the ML blocks; scripts/ are thin command lines over it."""
