"""medseg as a napari plugin (npe2; manifest ``napari.yaml``, entry point ``napari.manifest``).

Install with ``pip install 'medseg[napari]'``. Contributions:

- reader (:mod:`medseg.napari.reader`): DICOM series folders (one layer per series), one DICOM
  file (its whole series), NIfTI, NRRD, MHA, DICOM SEG / RTSTRUCT, through :mod:`medseg.io`;
- writer (:mod:`medseg.napari.writer`): a Labels layer to NIfTI / NRRD / MHA on its scan's grid;
- widgets: segment with a model bundle (:mod:`medseg.napari.segment`), score a prediction
  against a reference (:mod:`medseg.napari.evaluate`), fine-tune the model on corrected slices and
  compare (:mod:`medseg.napari.finetune`);
- sample data (:mod:`medseg.napari.sample`): the liver task's patients A and B.

World coordinates: (z, y, x) mm of the patient frame LPS (:mod:`medseg.napari.geometry`).
Only this package imports napari or Qt; importing it imports neither (each module does, when used).
"""
