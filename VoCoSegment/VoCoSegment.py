"""VoCoSegment: segment or classify a volume with a VoCo model, correct it, collect a cohort, finetune.

Thin Slicer module: widgets and the embedded Segment Editor only; the jobs are VoCoSlicerLib.segment_panel's.
"""

import sys

from VoCoSlicerLib.compat import unsupported_message

if unsupported_message(sys.version_info):  # older Slicer: this message, not an error from newer code below
    raise ImportError(unsupported_message(sys.version_info))

import importlib.util
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

from VoCoSlicerLib import models_view, module_support, panels, segment_flow, segment_panel
from VoCoSlicerLib.params import CohortParams, FinetuneParams, SegmentParams
from VoCoSlicerLib.state import JobState

PARAMETERS_SET_BY_CODE = ("model",)  # no standard widget binds a dynamic list: modelComboBox writes it
DOCS = "https://github.com/vocoslicer/VoCoSlicer#readme"


class VoCoSegment(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoSlicer", "Segmentations"]  # embeds the Segment Editor widget
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Segment or classify a CT volume with a VoCo model, correct the result with the "
                                 "Segment Editor, add corrected cases to a cohort and finetune the model on it. "
                                 "Set up PyTorch and models in the VoCoSlicer module.") + \
            f' <a href="{DOCS}">' + _("Documentation") + "</a>"
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
    uncertaintyMap: bool = False
    cohortDir: pathlib.Path
    annotator: str = ""
    steps: Annotated[int, WithinRange(1, 1000000)] = 200
    learningRate: Annotated[float, WithinRange(1e-6, 0.1)] = 1e-4
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    semiSupervised: bool = True
    vocoLoss: bool = False


class VoCoSegmentWidget(module_support.PanelPlumbing, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: binds the UI and the embedded Segment Editor; the jobs are VoCoSlicerLib.segment_panel's."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self.panel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSegmentLogic()
        self.panel = segment_panel.SegmentPanel(
            slicer.mrmlScene, slicer.util.tempDirectory, lambda: module_support.job_python(qt.QSettings()),
            self._showSegmentation, self._showTable,
            lambda entries, i: segment_panel.show_models(self.ui.modelComboBox, entries, i, self.onModelSelected),
            lambda fn: qt.QTimer.singleShot(0, fn),
            chart_title=_("Finetune"), startup_env=slicer.util.startupEnvironment, show_chart=self._showChart)
        self.logView = module_support.LogFollower()
        self._tick = module_support.TimerTick(lambda text: slicer.util.errorDisplay(text, windowTitle="VoCoSegment"))
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.logTextEdit.setMaximumBlockCount(2000)
        self.ui.cohortDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        editor = self.ui.segmentEditorWidget
        editor.setMRMLSegmentEditorNode(segment_flow.segment_editor_node(slicer.mrmlScene))
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()  # effects registered later
        self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._syncEditor)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._syncEditor)
        self.ui.cohortDirPathLineEdit.connect("currentPathChanged(QString)", self.onCohortFolderChanged)
        self.observeSceneClose(slicer.mrmlScene)
        self.ui.segmentButton.connect("clicked(bool)", lambda: self._run("segment"))
        self.ui.classifyButton.connect("clicked(bool)", lambda: self._run("classify"))
        self.ui.refreshModelsButton.connect("clicked(bool)", lambda: self._do(_("list models"),
                                                                              self.panel.refresh_models))
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addToCohortButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=True))
        self.ui.addUnlabelledButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=False))
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.nextCaseButton.connect("clicked(bool)", lambda: self._do(_("load the next case"), lambda: (
            self.panel.next_case(self._cohortParams().cohortDir, self._parameterNode.device))))
        self.ui.diceCurveButton.connect("clicked(bool)", lambda: self._do(
            _("draw the Dice curve"), lambda: self.panel.dice_curve(self._cohortParams().cohortDir)))
        self.ui.resumeFinetuneButton.connect("clicked(bool)", lambda: self._do(
            _("resume finetuning"), lambda: self._showChart(self.panel.resume_finetune())))
        self.initializeParameterNode()
        self._do(_("list models"), self.panel.refresh_models)

    def cleanup(self):
        self.removeObservers()
        self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
        self._timer.stop()
        self.panel.close()

    def enter(self):
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self._syncEditor()

    def exit(self):  # as Slicer's SegmentEditor.py: no effect, shortcuts or view observers left behind
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.ui.segmentEditorWidget.removeViewObservations()
        self.setParameterNode(None)

    def onEffectRegistered(self):
        self.ui.segmentEditorWidget.updateEffectList()

    def sceneClosing(self):
        self.panel.curves.reset()  # its node IDs may be reused by the next scene
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()

    def sceneClosed(self):
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(segment_flow.segment_editor_node(slicer.mrmlScene))

    def parameterNodeSet(self):
        pn = self._parameterNode
        if not pn.inputVolume:
            pn.inputVolume = segment_flow.default_input_volume(slicer.mrmlScene)
        self.panel.model = pn.model or self.panel.model

    def _syncEditor(self, _node=None):
        editor = self.ui.segmentEditorWidget
        segment_flow.sync_editor(editor.setSegmentationNode, editor.setSourceVolumeNode,
                                 self.ui.outputSegmentationSelector.currentNode(),
                                 self.ui.inputVolumeSelector.currentNode())

    def _do(self, what, fn):
        """A user action: its error in one dialog, then the timer follows whatever it started."""
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to {what}.").format(what=what), waitCursor=True):
                fn()
        except Exception:  # shown above; tryWithErrorDisplay re-raises, which would abort setup()
            logging.debug("%s failed", what, exc_info=True)
        if self.panel.busy and not self._timer.isActive():
            self._timer.start()
        self._updateGUI()

    def _cohortParams(self):
        return CohortParams(cohortDir=module_support.path_text(self._parameterNode.cohortDir),
                            annotator=self._parameterNode.annotator)

    def _run(self, op):
        pn = self._parameterNode
        entry = self.panel.entries[self.ui.modelComboBox.currentIndex] if self.panel.entries else None

        def start():
            params = SegmentParams(model=self.panel.model, device=pn.device, fast=pn.fast,
                                   useWarmWorker=pn.useWarmWorker, show3D=pn.show3D, uncertaintyMap=pn.uncertaintyMap)
            if self.panel.run(op, pn.inputVolume, pn.outputSegmentation, params, entry) == "confirm" and \
                    slicer.util.confirmOkCancelDisplay(models_view.download_question(entry)):
                self.panel.download(entry)

        self._do(_("start the job"), start)

    def onModelSelected(self, index):
        entry = self.panel.select(index)
        if entry is not None and self._parameterNode is not None:
            self._parameterNode.model = entry.spec
        self.ui.modelInfoLabel.text = models_view.info_text(entry)

    def onAddToCohort(self, labelled):
        pn = self._parameterNode
        self._do(_("add the case to the cohort"), lambda: self.panel.add_case(
            pn.inputVolume, pn.outputSegmentation, self._cohortParams(), labelled,
            self.ui.caseClassComboBox.currentText))

    def onCohortFolderChanged(self, path):  # the parameter node may lag behind the widget
        self._do(_("read the cohort"), lambda: self.panel.cohort_folder_changed(module_support.path_text(path)))

    def onFinetuneButton(self):
        pn = self._parameterNode
        self._do(_("start finetuning"), lambda: self._showChart(self.panel.start_finetune(FinetuneParams(
            baseModel=self.panel.model, cohortDir=self._cohortParams().cohortDir, steps=pn.steps,
            learningRate=pn.learningRate, batchSize=pn.batchSize, semiSupervised=pn.semiSupervised,
            vocoLoss=pn.vocoLoss, device=pn.device))))

    # ------------------------------------------------------------------ results (called by the panel)
    def _showSegmentation(self, seg, volume):  # a segment result, or the next case to correct (seg may be None)
        if self._parameterNode is not None:
            self._parameterNode.inputVolume, self._parameterNode.outputSegmentation = volume, seg
            if seg is not None and self._parameterNode.show3D:
                seg.CreateClosedSurfaceRepresentation()
        self._syncEditor()
        slicer.util.setSliceViewerLayers(background=volume)

    def _showTable(self, table):
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def _showChart(self, chart):
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    # ------------------------------------------------------------------ polling and GUI state
    def _onTimer(self):  # one report per tick, no re-entry while a dialog is open (module_support.TimerTick)
        self._tick([*self.panel.tick_steps(), (_("Live curves"), lambda: self._showChart(self.panel.draw_curves())),
                    (_("Panel update"), self._updateGUI)])
        if not self.panel.busy:
            self._timer.stop()

    def _updateGUI(self):
        view = self.panel.view()
        panels.show_job(view.segment, self.ui.segmentButton if view.segmenting else self.ui.classifyButton,
                        self.ui.progressBar, self.ui.statusLabel)
        self.ui.segmentButton.enabled = view.idle or view.segmenting
        self.ui.classifyButton.enabled = view.idle or not view.segmenting
        if view.idle:
            self.ui.segmentButton.text, self.ui.classifyButton.text = _("Segment"), _("Classify")
        panels.show_job(view.finetune, self.ui.finetuneButton, self.ui.finetuneProgressBar,
                        self.ui.finetuneStatusLabel)
        self.ui.resumeFinetuneButton.enabled = view.resume_enabled
        self.ui.addToCohortButton.enabled = self.ui.addUnlabelledButton.enabled = view.add_enabled
        self.ui.refreshModelsButton.enabled = view.refresh_enabled
        self.ui.nextCaseButton.enabled = self.ui.diceCurveButton.enabled = view.active_enabled
        self.ui.cohortCountsLabel.text = self.panel.cohort_text
        self.ui.uncertaintyLabel.text, self.ui.activeLabel.text = self.panel.uncertainty_text, self.panel.active_text
        segment_panel.show_classes(self.ui.caseClassComboBox, self.panel.classes, self.panel.take_class_proposal())
        if self.panel.model_error:
            self.ui.modelInfoLabel.text = self.panel.model_error
        self.logView.show(self.ui.logTextEdit, self.panel.logs())


class VoCoSegmentLogic(ScriptedLoadableModuleLogic):
    """Parameter node only; the work itself is in VoCoSlicerLib."""

    def getParameterNode(self):
        return VoCoSegmentParameterNode(super().getParameterNode())


class VoCoSegmentTest(ScriptedLoadableModuleTest):
    """In-app test: phantom -> segment with the bundled model -> correct -> cohort; skips without torch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_and_add_to_cohort()

    def _run(self, driver, timeout=600):
        self.assertTrue(module_support.wait_for(driver, slicer.app.processEvents, timeout), "job timed out")
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)

    def test_segment_phantom_and_add_to_cohort(self):
        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed (installs are skipped in testing mode)")
        segments, counts = segment_panel.self_test(slicer.mrmlScene, pathlib.Path(slicer.util.tempDirectory()),
                                                   lambda path: slicer.util.loadVolume(str(path)), self._run)
        self.assertGreaterEqual(segments, 1)
        self.assertEqual((counts.total, counts.labelled), (1, 1))
        self.delayDisplay("Test passed")
