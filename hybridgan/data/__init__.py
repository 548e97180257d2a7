"""Data: synthetic faces, masks, the pretraining blur, pack manifests and the WebDataset loader.

Submodules are imported where used (`hybridgan.data.loader` pulls in torch and webdataset):
`synthetic`, `masks`, `blur`, `manifest`, `plan` (the epoch plan), `samples` (reading a sample),
`loader` and `resident`; packing lives in `hybridgan.pack`.
"""
