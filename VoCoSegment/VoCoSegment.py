"""VoCoSegment: segment or classify a volume with a VoCo model, correct it, collect a cohort, finetune.

Thin Slicer module: the widget binds the .ui to a parameter node and drives background jobs through
VoCoSlicerLib (no torch in the Slicer process; every job is a ``PythonSlicer -m vocoslicer`` child).
"""

import logging
import pathlib
from typing import Annotated

import ctk
import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import cohort_view, models_view, plots, segment_flow
from VoCoSlicerLib.engine import python_executable
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import DEMO_MODEL_ID, CohortParams, FinetuneParams, SegmentParams
from VoCoSlicerLib.state import JobState

PYTHON_SETTING = "VoCoSlicer/PythonExecutable"  # written by the VoCoSlicer set-up module
PARAMETERS_SET_BY_CODE = ("model",)  # no standard widget binds a dynamic list: modelComboBox writes it


class VoCoSegment(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoSlicer"]
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Segment or classify a CT volume with a VoCo model, correct the result with the "
                                 "Segment Editor, add corrected cases to a cohort and finetune the model on it. "
                                 "Set up PyTorch and models in the VoCoSlicer module.")
        self.parent.acknowledgementText = _("VoCo: Wu, Zhuang, Chen, Large-Scale 3D Medical Image Pre-training "
                                            "with Geometric Context Priors. PUMIT: Luo et al.")


@parameterNodeWrapper
class VoCoSegmentParameterNode:
    """What the panel edits; mirrors VoCoSlicerLib.params (SegmentParams, CohortParams, FinetuneParams)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    fast: bool = False
    useWarmWorker: bool = True
    show3D: bool = False
    cohortDir: pathlib.Path
    annotator: str = ""
    steps: Annotated[int, WithinRange(1, 1000000)] = 200
    learningRate: Annotated[float, WithinRange(1e-6, 0.1)] = 1e-4
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    semiSupervised: bool = True
    vocoLoss: bool = False


class VoCoSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: binds the UI, starts jobs, polls them with a QTimer, turns their outputs into nodes."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._task = None
        self._onSuccess = None
        self._catalog = []
        self._chart = None
        self._finetuneBase = ""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSegmentLogic()
        self.jobDriver = JobDriver(_("Segment"), on_finished=self._onJobFinished)
        self.cohortDriver = JobDriver(_("Add"), on_finished=self._onCohortFinished)
        self.finetuneDriver = JobDriver(_("Finetune"), on_finished=self._onFinetuneFinished)
        self.modelsDriver = JobDriver(_("Refresh"), on_finished=self._onModelsListed)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self.ui.cohortDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.segmentEditorWidget.setSegmentationNodeSelectorVisible(False)
        self.ui.segmentEditorWidget.setSourceVolumeNodeSelectorVisible(False)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.ui.segmentEditorWidget.setSegmentationNode)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                            self.ui.segmentEditorWidget.setSourceVolumeNode)
        self.ui.cohortDirPathLineEdit.connect("currentPathChanged(QString)", self.onCohortFolderChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addToCohortButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=True))
        self.ui.addUnlabelledButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=False))
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.resumeFinetuneButton.connect("clicked(bool)", self.onResumeFinetune)
        self.initializeParameterNode()
        self.onRefreshModels()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        for driver in (self.jobDriver, self.cohortDriver, self.modelsDriver):
            driver.cancel()  # finetune runs are detached on purpose: they survive the panel
        if self._worker is not None:
            self._worker.close()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())  # was cleared too
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        import VoCoSlicerLib

        VoCoSlicerLib.reload_package()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ------------------------------------------------------------------ settings -> VoCoSlicerLib params
    def _python(self):
        return python_executable(str(qt.QSettings().value(PYTHON_SETTING, "") or ""))

    def _segmentParams(self):
        pn = self._parameterNode
        return SegmentParams(model=pn.model, device=pn.device, fast=pn.fast, useWarmWorker=pn.useWarmWorker,
                             show3D=pn.show3D)

    def _cohortParams(self):
        folder = str(self._parameterNode.cohortDir)
        return CohortParams(cohortDir="" if folder in ("", ".") else folder, annotator=self._parameterNode.annotator)

    def _inputVolume(self):
        volume = self._parameterNode.inputVolume
        if volume is None:
            raise ValueError(_("Select an input volume first."))
        return volume

    def _startTimer(self):
        if not self._timer.isActive():
            self._timer.start()
        self._updateGUI()

    # ------------------------------------------------------------------ segment / classify
    def onSegmentButton(self):
        self._runOnVolume("segment")

    def onClassifyButton(self):
        self._runOnVolume("classify")

    def _runOnVolume(self, op):
        if self.jobDriver.busy:
            self.jobDriver.cancel()
            self._updateGUI()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the job."), waitCursor=True):
            volume, params = self._inputVolume(), self._segmentParams()
            prepare = segment_flow.prepare_segment if op == "segment" else segment_flow.prepare_classify
            self._task = prepare(volume, params, slicer.util.tempDirectory())
            self._onSuccess = self._loadSegmentation if op == "segment" else self._loadClassification
            self.jobDriver.state.action = _("Segment") if op == "segment" else _("Classify")
            self.jobDriver.python = self._python()
            if params.useWarmWorker:
                self.jobDriver.start_request(self._warmWorker(), op, self._task.request, fallback=self._task.args)
            else:
                self.jobDriver.start([self._task.args], python=self._python())
            self._startTimer()

    def _warmWorker(self):
        from VoCoSlicerLib.worker_client import WorkerClient

        if self._worker is None or self._worker.python != self._python():
            if self._worker is not None:
                self._worker.close()
            self._worker = WorkerClient(python=self._python())
        return self._worker

    def _loadSegmentation(self):
        pn = self._parameterNode
        seg = segment_flow.load_segment_result(slicer.mrmlScene, self._task, pn.inputVolume, pn.outputSegmentation,
                                               self.jobDriver.artifact("segmentation") or self._workerArtifact())
        pn.outputSegmentation = seg
        self.ui.segmentEditorWidget.setSegmentationNode(seg)
        self.ui.segmentEditorWidget.setSourceVolumeNode(pn.inputVolume)
        if pn.show3D:
            seg.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=pn.inputVolume)

    def _workerArtifact(self):
        result = self.jobDriver.result or {}
        return {"labels": result.get("labels"), "model": result.get("model_id") or result.get("model"),
                "model_version": result.get("model_version")} if result else None

    def _loadClassification(self):
        table = segment_flow.load_classify_result(slicer.mrmlScene, self._task, self._parameterNode.inputVolume)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def _onJobFinished(self, driver):
        if driver.state.state is JobState.DONE and self._onSuccess is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to load the job's result."), waitCursor=True):
                self._onSuccess()
        self._onSuccess = None

    # ------------------------------------------------------------------ models
    def onRefreshModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to list models.")):
            if not self.modelsDriver.busy:
                self.modelsDriver.start([models_view.list_args()], run_dir=slicer.util.tempDirectory(),
                                        python=self._python())
                self._startTimer()

    def _onModelsListed(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.modelInfoLabel.text = _("Could not list models: ") + driver.state.message
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to read the model list.")):
            self._catalog = models_view.parse_catalog(driver.json_output())
            current = self._parameterNode.model if self._parameterNode else ""
            combo = self.ui.modelComboBox
            combo.blockSignals(True)
            combo.clear()
            combo.addItem(_("Default (bundled demo model)"), "")
            for row in models_view.selectable(self._catalog, "segmentation") + \
                    models_view.selectable(self._catalog, "classification"):
                combo.addItem(f"{row.display_name}  [{row.task}]", row.spec)
            index = combo.findData(current)
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(False)
            self.onModelSelected(combo.currentIndex)

    def onModelSelected(self, index):
        if self._parameterNode is None or index < 0:
            return
        spec = self.ui.modelComboBox.itemData(index) or ""
        self._parameterNode.model = spec
        row = models_view.find(self._catalog, spec)
        self.ui.modelInfoLabel.text = (f"{row.title or row.id} {row.version}: {row.task}" + (
            f", finetuned from {row.parent}" if row.parent else "")) if row else ""
        self._updateGUI()

    # ------------------------------------------------------------------ cohort
    def onAddToCohort(self, labelled):
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case to the cohort."), waitCursor=True):
            pn = self._parameterNode
            seg = pn.outputSegmentation if labelled else None
            if labelled and seg is None:
                raise ValueError(_("Segment the volume (and correct it) first."))
            commands = segment_flow.prepare_cohort_case(slicer.mrmlScene, self._inputVolume(), seg,
                                                        self._cohortParams(), slicer.util.tempDirectory())
            commands.append(self._cohortParams().list_args())
            self.cohortDriver.start(commands, run_dir=slicer.util.tempDirectory(), python=self._python())
            self._startTimer()

    def onCohortFolderChanged(self, path):
        if self.cohortDriver.busy:
            return
        params = CohortParams(cohortDir="" if path in ("", ".") else path)  # the parameter node may lag behind
        if not cohort_view.is_cohort(params.cohortDir):
            self.ui.cohortCountsLabel.text = _("New cohort: created on the first add.") if params.cohortDir else ""
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to read the cohort.")):
            self.cohortDriver.start([params.list_args()], run_dir=slicer.util.tempDirectory(), python=self._python())
            self._startTimer()

    def _onCohortFinished(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.cohortCountsLabel.text = _("Not added: ") + driver.state.message
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to read the cohort.")):
            self.ui.cohortCountsLabel.text = cohort_view.counts_from_list(driver.json_output()).summary()

    # ------------------------------------------------------------------ finetune
    def onFinetuneButton(self):
        if self.finetuneDriver.busy:
            self.finetuneDriver.cancel()
            self._updateGUI()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start finetuning."), waitCursor=True):
            pn = self._parameterNode
            base = pn.model or DEMO_MODEL_ID
            params = FinetuneParams(baseModel=base, cohortDir=self._cohortParams().cohortDir, steps=pn.steps,
                                    learningRate=pn.learningRate, batchSize=pn.batchSize,
                                    semiSupervised=pn.semiSupervised, vocoLoss=pn.vocoLoss,
                                    device=pn.device)
            runDir = new_run_dir("finetune")
            self._finetuneBase = base
            self.finetuneDriver.start([params.args(str(runDir))], run_dir=runDir, detached=True,
                                      python=self._python())
            self._newChart()
            self._startTimer()

    def onResumeFinetune(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to resume finetuning."), waitCursor=True):
            runs = [r for r in list_runs() if str(r.get("command", "")).startswith("finetune")
                    and r.get("status") in ("cancelled", "failed", "dead")]
            if not runs:
                raise ValueError(_("There is no stopped finetune run to resume."))
            self.finetuneDriver.python = self._python()
            self.finetuneDriver.resume(runs[0]["run_dir"], detached=True)
            self._newChart()
            self._startTimer()

    def _newChart(self):
        self._chart = plots.new_chart(slicer.mrmlScene, _("Finetune"))
        slicer.modules.plots.logic().ShowChartInLayout(self._chart)

    def _onFinetuneFinished(self, driver):
        model = driver.artifact("model")
        if driver.state.state is JobState.DONE and model:
            self._parameterNode.model = model["path"]  # selected once the refreshed list arrives
            self.onRefreshModels()
            driver.state.message = _("New model {id} {version} (validation Dice {dice})").format(
                id=model.get("id", ""), version=model.get("version", ""), dice=model.get("val_dice", "?"))

    # ------------------------------------------------------------------ polling and GUI state
    def _onTimer(self):
        drivers = (self.jobDriver, self.cohortDriver, self.finetuneDriver, self.modelsDriver)
        for driver in drivers:
            if driver.busy:
                with slicer.util.tryWithErrorDisplay(_("Job monitoring failed.")):
                    driver.tick()
        if self._chart is not None and self.finetuneDriver.metrics.names():
            plots.update_chart(slicer.mrmlScene, self._chart, self.finetuneDriver.metrics)
        if not any(d.busy for d in drivers):
            self._timer.stop()
        self._updateGUI()

    def _showJob(self, driver, button, bar, label):
        view = driver.state.view()
        button.text = view.button_text
        button.toolTip = view.button_tooltip
        button.enabled = view.button_enabled
        bar.visible = view.progress_visible
        bar.maximum = 0 if view.progress_percent < 0 else 100
        bar.value = max(view.progress_percent, 0)
        label.text = (view.progress_text + "   " + driver.throughput.text()).strip()

    def _updateGUI(self):
        self._showJob(self.jobDriver, self.ui.segmentButton if self.jobDriver.state.action == _("Segment")
                      else self.ui.classifyButton, self.ui.progressBar, self.ui.statusLabel)
        idle = not self.jobDriver.busy
        self.ui.segmentButton.enabled = idle or self.jobDriver.state.action == _("Segment")
        self.ui.classifyButton.enabled = idle or self.jobDriver.state.action == _("Classify")
        if idle:
            self.ui.segmentButton.text, self.ui.classifyButton.text = _("Segment"), _("Classify")
        self._showJob(self.finetuneDriver, self.ui.finetuneButton, self.ui.finetuneProgressBar,
                      self.ui.finetuneStatusLabel)
        self.ui.resumeFinetuneButton.enabled = not self.finetuneDriver.busy
        cohortIdle = not self.cohortDriver.busy
        self.ui.addToCohortButton.enabled = cohortIdle and idle
        self.ui.addUnlabelledButton.enabled = cohortIdle and idle
        self.ui.refreshModelsButton.enabled = not self.modelsDriver.busy
        self.ui.logTextEdit.setPlainText("\n".join(
            f"[{d.state.action}] {line}" for d in (self.jobDriver, self.cohortDriver, self.finetuneDriver)
            for line in list(d.log)[-200:]))


class VoCoSegmentLogic(ScriptedLoadableModuleLogic):
    """Parameter node and the embedded Segment Editor's node; the work itself is in VoCoSlicerLib."""

    def getParameterNode(self):
        return VoCoSegmentParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        node = slicer.mrmlScene.GetFirstNodeByName("VoCoSegmentEditor")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "VoCoSegmentEditor")
        return node


class VoCoSegmentTest(ScriptedLoadableModuleTest):
    """In-app test: phantom -> segment with the bundled model -> correct -> cohort; skips without torch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_and_add_to_cohort()

    def _run(self, driver, timeout=600):
        import time

        deadline = time.time() + timeout
        while driver.busy and time.time() < deadline:
            driver.tick()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertFalse(driver.busy, "job timed out")
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)

    def test_segment_phantom_and_add_to_cohort(self):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed (installs are skipped in testing mode): test skipped")
            return
        tmp = pathlib.Path(slicer.util.tempDirectory())
        driver = JobDriver("test", log_lines=100)
        driver.start([["phantom", "--seed", "7", "--size", "64", "64", "32", "-o", str(tmp / "ph"),
                       "--format", ".nrrd"]])
        self._run(driver)
        image = sorted((tmp / "ph").glob("*_ct.nrrd"))[0]
        volume = slicer.util.loadVolume(str(image))
        task = segment_flow.prepare_segment(volume, SegmentParams(device="cpu", fast=True), tmp / "job")
        driver.start([task.args])
        self._run(driver)
        seg = segment_flow.load_segment_result(slicer.mrmlScene, task, volume,
                                               artifact=driver.artifact("segmentation"))
        self.assertGreaterEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        cohort = CohortParams(cohortDir=str(tmp / "cohort"), annotator="self-test")
        commands = segment_flow.prepare_cohort_case(slicer.mrmlScene, volume, seg, cohort, tmp / "case")
        driver.start([*commands, cohort.list_args()], run_dir=tmp / "cohort-runs")
        self._run(driver)
        counts = cohort_view.counts_from_list(driver.json_output())
        self.assertEqual((counts.total, counts.labelled), (1, 1))
        logging.info("VoCoSegment self-test passed")
        self.delayDisplay("Test passed")
