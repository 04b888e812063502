"""The self-test run inside Slicer (Reload and Test, or ctest): the service, the effect, a prompt,
undo, a 5-step adaptation and a batch of two volumes, then "Add this case" + "Update adapter" (5 steps)
and a batch of two volumes written as files, on synthetic sphere volumes."""

import time

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

__all__ = ["MedFMSegmentTest"]


def _sphere_volume(name: str, centre_i: int = 48):
    k, j, i = np.ogrid[0:24, 0:96, 0:96]
    sphere = ((i - centre_i) ** 2 + (j - 44) ** 2 + ((k - 12) * 3.0) ** 2) <= 20 ** 2
    voxels = (sphere * 800 + np.random.default_rng(0).normal(100, 20, sphere.shape)).astype(np.int16)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetSpacing(1.0, 1.0, 3.0)
    slicer.util.updateVolumeFromArray(volume, voxels)
    volume.CreateDefaultDisplayNodes()
    return volume, sphere


def _wait(condition, timeout_s: float, step_s: float = 0.1) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        slicer.app.processEvents()
        if condition():
            return True
        time.sleep(step_s)
    return False


class MedFMSegmentTest(ScriptedLoadableModuleTest):
    """Service start, effect box prompt + undo, 5-step adaptation, batch of two volumes."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MedFMSegment_service_effect_adaptation_batch()
        self.test_MedFMSegment_update_adapter_and_batch_files()

    def test_MedFMSegment_service_effect_adaptation_batch(self) -> None:
        from MedFMSegmentHelpers.logic import MedFMSegmentLogic
        from MedFMSegmentLib.metrics import dice
        from MedFMSegmentLib.slicer_bridge import segment_to_mask

        logic = MedFMSegmentLogic.shared()
        if logic.client is None:
            logic.startLocalService(None)
            self.assertTrue(_wait(lambda: logic.client is not None or logic.process is None, 300),
                            "the local service did not start")
        self.assertIsNotNone(logic.client, "the local service failed; see the Python console")

        volume, sphere = _sphere_volume("Sphere")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("sphere")

        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID(segment_id)
        editor.setActiveEffectByName("MedFMSegment")
        effect = editor.activeEffect().self()
        self.delayDisplay("Box prompt on slice 12")
        effect._addBox(np.array([26.0, 22.0, 12.0]), np.array([70.0, 66.0, 12.0]), (2, 12))
        self.assertTrue(_wait(lambda: not effect.controller.busy, 120))
        mask = segment_to_mask(segmentation, segment_id, volume)
        truth = np.zeros_like(sphere)
        truth[12] = sphere[12]
        self.assertGreater(dice(mask, truth), 0.8)
        self.assertEqual(int(mask[:12].sum() + mask[13:].sum()), 0, "a flat box stays 2D")
        editor.undo()
        self.assertEqual(int(segment_to_mask(segmentation, segment_id, volume).sum()), 0, "Segment Editor undo")
        editor.setActiveEffectByName("")

        self.delayDisplay("The panel's Segment Editor button on a segmentation without segments")
        slicer.util.selectModule("MedFMSegment")
        panel = slicer.modules.medfmsegment.widgetRepresentation().self()
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
        panel._parameterNode.inputVolume, panel._parameterNode.segmentation = volume, empty
        panel.onOpenEffect()
        self.assertEqual(empty.GetSegmentation().GetNumberOfSegments(), 1, "a segment to write into was added")
        self.assertEqual(editor.currentSegmentID(), empty.GetSegmentation().GetNthSegmentID(0))
        self.assertEqual(editor.activeEffect().name, "MedFMSegment")
        editor.setActiveEffectByName("")

        self.delayDisplay("Adaptation: 5 steps")
        from MedFMSegmentLib.slicer_bridge.cases import training_pair

        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Training")
        label.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        from MedFMSegmentLib.slicer_bridge import mask_to_segment

        mask_to_segment(sphere, volume, label, segment_name="sphere")
        image, target = training_pair(volume, label)
        name = f"selftest-{int(time.time())}"
        job = logic.client.finetune([image], [target], {"name": name, "steps": 5})
        self.assertTrue(_wait(lambda: logic.client.job(job).state in ("done", "failed", "cancelled"), 600))
        self.assertEqual(logic.client.job(job).state, "done", logic.client.job(job).message)
        self.assertIn(name, [a["name"] for a in logic.client.adapters()])
        self.adapterName = name  # updated by test_MedFMSegment_update_adapter_and_batch_files

        self.delayDisplay("Batch of two volumes with the adapter")
        second, _ = _sphere_volume("Sphere 2", centre_i=52)
        for node in (volume, second):
            from MedFMSegmentLib.slicer_bridge import volume_node_to_image

            data = volume_node_to_image(node)
            job = logic.client.automatic(logic.client.upload_volume(data.array, data.geometry), name)
            self.assertTrue(_wait(lambda: logic.client.job(job).state in ("done", "failed", "cancelled"), 600))
            self.assertEqual(logic.client.job(job).state, "done")
            self.assertEqual(logic.client.result(job).shape, data.array.shape)
        self.delayDisplay("Test passed")

    def test_MedFMSegment_update_adapter_and_batch_files(self) -> None:
        """"Add this case" + "Update adapter" (5 steps), base and adapted Dice side by side, and a
        batch of two volumes written as files in a batch format (what the panel's buttons call)."""
        import tempfile
        from pathlib import Path

        from MedFMSegmentHelpers.logic import MedFMSegmentLogic
        from MedFMSegmentLib.io import read_label
        from MedFMSegmentLib.slicer_bridge import mask_to_segment, volume_node_to_image
        from MedFMSegmentLib.slicer_bridge.outputs import output_paths, write_output
        from MedFMSegmentLib.slicer_bridge.updates import PendingCases

        logic = MedFMSegmentLogic.shared()
        name = getattr(self, "adapterName", None)
        self.assertIsNotNone(name, "run after test_MedFMSegment_service_effect_adaptation_batch")
        self.delayDisplay("Add this case, then Update adapter: 5 steps")
        volume, sphere = _sphere_volume("Corrected case", centre_i=50)
        corrected = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Corrected")
        mask_to_segment(sphere, volume, corrected, segment_name=name)
        pending = PendingCases()
        pending.add(volume, corrected, name)
        job = pending.submit(logic.client, name, steps=5)
        self.assertTrue(_wait(lambda: logic.client.job(job).state in ("done", "failed", "cancelled"), 600))
        self.assertEqual(logic.client.job(job).state, "done", logic.client.job(job).message)
        metadata = {a["name"]: a["metadata"] for a in logic.client.adapters()}[name]
        self.assertEqual(metadata["lineage"][-1]["cases_added"], 1)
        self.assertIsNotNone(metadata.get("base_validation_dice"))
        self.assertIsNotNone(metadata.get("adapted_validation_dice"))

        self.delayDisplay("Batch of two volumes written as NIfTI files")
        second, _ = _sphere_volume("Batch 2", centre_i=46)
        volumes = [volume, second]
        with tempfile.TemporaryDirectory() as folder:
            paths = output_paths(volumes, folder, "nii.gz")
            for node, path in zip(volumes, paths):
                data = volume_node_to_image(node)
                job = logic.client.automatic(logic.client.upload_volume(data.array, data.geometry), name)
                self.assertTrue(_wait(lambda: logic.client.job(job).state in ("done", "failed", "cancelled"), 600))
                mask = logic.client.result(job)
                write_output(mask, node, path, "nii.gz", segment_name=name)
                self.assertTrue(np.array_equal(read_label(path).array > 0, mask > 0))
            self.assertEqual(sorted(Path(p).name for p in paths), ["Batch_2.nii.gz", "Corrected_case.nii.gz"])
        self.delayDisplay("Update and batch files passed")
