"""The session's rooms, one role each: `install` (patch and undo), `state` (per-pass forward state),
`features` (image-feature interception and feature plans), `planner` (one attention call's plan)."""
